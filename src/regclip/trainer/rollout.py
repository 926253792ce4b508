r"""SDE rollouts on a diffusers transformer, and the matching recomputation for training.

A rollout integrates the flow ODE on the pipeline's sigma schedule from pure noise
(``t = sigmas[0] = 1``) to data (``t = 0``). Steps listed in ``sde_steps`` are drawn from
the transition kernel (``x' = mu + s_t eps``, the steps that are trained, as in MixGRPO and
Flow-GRPO-Fast); every other step is the deterministic Euler step ``x' = x + v dt``.

For every SDE step ``k`` the :class:`Rollout` records exactly what a PPO update needs:
the input latents ``x_t``, the draw ``x_{t+dt}``, the rollout log-prob (the kernel's
convention), the rollout policy's proposal mean ``mu_old`` (``store_old_means``; see
:meth:`Rollout.old_mean` for regenerating it instead from the recorded per-sample noise
seeds, ``mu_old = x_{t+dt} - s_t eps``, :mod:`regclip.replay`), plus ``t``, ``dt`` and
``s_t``.

:func:`recompute_transition` evaluates the current policy on a recorded step with the
same batch layout, dtype and guidance as the rollout, so with unchanged weights it
returns bit-identical means (log-ratio exactly 0). :func:`recompute_transitions` stacks
several recorded steps into one transformer call (rows ``j * B + i``: sample ``i`` at the
``j``-th listed step, each row at its own noise level); the per-row results are those of
the per-step calls up to the floating-point effect of the larger batch on the matmuls.

Nothing here reads a device value on the host: the schedule goes to the device once per
rollout, and ``t``, ``dt`` and ``std`` stay there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import replay
from ..kernels import KernelStep, TransitionKernel
from .arch import Architecture, Guidance, PromptEmbeds

__all__ = [
    "Rollout",
    "SamplerConfig",
    "recompute_transition",
    "recompute_transitions",
    "sample_rollout",
]


@dataclass(frozen=True)
class SamplerConfig:
    """What a rollout does. ``sde_steps`` index the ``num_steps`` steps (0 = first, t = 1)."""

    num_steps: int = 10
    sde_steps: tuple[int, ...] | None = None
    """Default: every step but the last (``timestep_fraction`` ~ 1 upstream)."""
    height: int = 512
    width: int = 512
    guidance: Guidance = field(default_factory=Guidance)
    store_old_means: bool = True
    """Record mu_old. If False, :meth:`Rollout.old_mean` regenerates it from the noise seeds."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"`num_steps` must be >= 1, got {self.num_steps}")
        requested = range(max(self.num_steps - 1, 1)) if self.sde_steps is None else self.sde_steps
        steps = tuple(sorted(set(requested)))
        if not steps:
            raise ValueError("`sde_steps` is empty: a rollout needs at least one trained step")
        if steps[0] < 0 or steps[-1] >= self.num_steps:
            raise ValueError(f"`sde_steps` must lie in [0, {self.num_steps}), got {self.sde_steps}")
        object.__setattr__(self, "sde_steps", steps)

    @property
    def trained_steps(self) -> tuple[int, ...]:
        """The sorted SDE step indices (``sde_steps`` after validation)."""
        assert self.sde_steps is not None
        return self.sde_steps


@dataclass
class Rollout:
    """One batch of B trajectories; K = number of SDE (trained) steps. All float32."""

    latents: Tensor
    """(B, K, ...) x_t at each SDE step."""
    next_latents: Tensor
    """(B, K, ...) the kernel's draw x_{t+dt}."""
    log_probs: Tensor
    """(B, K) rollout log-probs (kernel convention)."""
    old_means: Tensor | None
    """(B, K, ...) rollout proposal means, or None when regenerated from ``noise_seeds``."""
    noise_seeds: Tensor
    """(B,) int64 per-sample noise seeds (CPU): the draw of sample ``i`` at schedule step
    ``j`` is ``regclip.replay.step_noise(noise_seeds, j, ...)[i]``."""
    steps: Tensor
    """(K,) int64 step indices into the schedule (CPU)."""
    t: Tensor
    """(K,) sigma at the start of each SDE step (on the latents' device)."""
    dt: Tensor
    """(K,) sigma_{next} - sigma (negative; on the latents' device)."""
    std: Tensor
    """(K,) transition std s_t (on the latents' device)."""
    final: Tensor
    """(B, ...) the end of the trajectory (x at t = 0)."""
    embeds: PromptEmbeds
    """Per-sample conditioning (B rows)."""
    prompt_ids: Tensor
    """(B,) int64 prompt index of each sample (the advantage groups)."""
    advantages: Tensor | None = None
    """(B,) filled in by the trainer after the rewards."""

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_sde_steps(self) -> int:
        return int(self.steps.shape[0])

    def stacked(self, field: Tensor, ks: tuple[int, ...]) -> Tensor:
        """(len(ks) * B, ...) rows of a (B, K, ...) field at SDE steps ``ks``, step-major
        (row ``j * B + i``: sample ``i`` at step ``ks[j]``), contiguous."""
        if len(ks) == 1:  # the rollout's own layout: a plain contiguous copy of one step
            return field[:, ks[0]].contiguous()
        return field[:, _steps(ks)].transpose(0, 1).reshape(-1, *field.shape[2:])

    def per_row(self, values: Tensor, ks: tuple[int, ...]) -> Tensor:
        """(len(ks) * B,) a (K,) per-step value repeated for each sample, step-major."""
        return values[_steps(ks)].repeat_interleave(self.batch_size)

    def old_mean(self, k: int) -> Tensor:
        """(B, ...) rollout mean of SDE step ``k``: stored, or ``x' - s_t eps`` regenerated.

        Regeneration (:func:`regclip.replay.old_mean_from_noise`) is exact up to float32
        rounding of ``mu + s eps - s eps``; the noise is redrawn on the latents' device,
        which must be the rollout's device type.
        """
        if self.old_means is not None:
            return self.old_means[:, k]
        nxt = self.next_latents[:, k]
        noise = _step_noise(self.noise_seeds, int(self.steps[k]), nxt)
        return replay.old_mean_from_noise(nxt, self.std[k], noise)


def _steps(ks: tuple[int, ...]) -> slice | list[int]:
    """An index for steps ``ks``: a slice when they are consecutive (no index tensor to
    copy to the device), else the list."""
    if list(ks) == list(range(ks[0], ks[0] + len(ks))):
        return slice(ks[0], ks[0] + len(ks))
    return list(ks)


def _step_noise(seeds: Tensor, step: int, like: Tensor) -> Tensor:
    """(B, ...) float32 noise of schedule step ``step``, shaped and placed like ``like``."""
    return replay.step_noise(seeds, step, like.shape[1:], device=like.device)


def _new_seeds(batch: int, generator: torch.Generator) -> Tensor:
    """(batch,) int64 CPU seeds drawn from ``generator``'s stream, whatever its device."""
    if generator.device.type != "cpu":
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        generator = torch.Generator().manual_seed(int(seed))
    return replay.new_seeds(batch, generator)


@torch.no_grad()
def sample_rollout(
    model: nn.Module,
    arch: Architecture,
    kernel: TransitionKernel,
    sigmas: Tensor,
    embeds: PromptEmbeds,
    prompt_ids: Tensor,
    config: SamplerConfig,
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device,
    channels: int,
) -> Rollout:
    """Integrate B trajectories (B = ``len(embeds)``) and record the SDE steps.

    Args:
        model: the transformer (LoRA-wrapped or not); called in whatever mode it is in.
        arch: its :class:`~regclip.trainer.arch.Architecture`.
        kernel: the transition kernel used on ``config.sde_steps``.
        sigmas: (num_steps + 1,) schedule from ``arch.sigmas``.
        embeds: B rows of conditioning (one per sample).
        prompt_ids: (B,) group id of each sample.
        generator: seeds the initial noise and the per-sample noise seeds.
        dtype: model input precision (latents are kept in float32 between steps).
        channels: the transformer's ``in_channels``.
    """
    if sigmas.shape[0] != config.num_steps + 1:
        raise ValueError(f"`sigmas` has {sigmas.shape[0]} entries, expected {config.num_steps + 1}")
    batch = len(embeds)
    x = arch.initial_latents(batch, channels, config.height, config.width, generator, device)
    record: dict[str, list[Tensor]] = {"x": [], "next": [], "logp": [], "mean": [], "std": []}
    sde_steps = config.trained_steps
    seeds = _new_seeds(batch, generator)
    schedule = sigmas.to(device=device, dtype=torch.float32)  # one transfer per rollout
    steps = schedule[1:] - schedule[:-1]
    for i in range(config.num_steps):
        t, dt = schedule[i], steps[i]
        v = arch.velocity(model, x, t, embeds, config.guidance, config.height, config.width, dtype)
        if i not in sde_steps:
            x = x + v * dt
            continue
        noise = _step_noise(seeds, i, x)
        out = kernel.step(x, v, t.expand(batch), dt.expand(batch), noise=noise)
        record["x"].append(x)
        record["next"].append(out.next_sample)
        record["logp"].append(out.log_prob)
        if config.store_old_means:
            record["mean"].append(out.mean)
        record["std"].append(out.std[0].float())
        x = out.next_sample
    index = list(sde_steps)
    return Rollout(
        latents=torch.stack(record["x"], 1),
        next_latents=torch.stack(record["next"], 1),
        log_probs=torch.stack(record["logp"], 1),
        old_means=torch.stack(record["mean"], 1) if config.store_old_means else None,
        noise_seeds=seeds,
        steps=torch.tensor(sde_steps, dtype=torch.long),
        t=schedule[index],
        dt=steps[index],
        std=torch.stack(record["std"]),
        final=x,
        embeds=embeds,
        prompt_ids=prompt_ids.cpu().long(),
    )


def _stacked_velocity(
    model: nn.Module,
    arch: Architecture,
    rollout: Rollout,
    ks: tuple[int, ...],
    config: SamplerConfig,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs x (S B, ...), t (S B,), dt (S B,) of SDE steps ``ks`` (rows step-major) and
    the current policy's velocity there, in one transformer call."""
    if not ks:
        raise ValueError("`ks` is empty: name at least one SDE step")
    x = rollout.stacked(rollout.latents, ks)
    t, dt = rollout.per_row(rollout.t, ks), rollout.per_row(rollout.dt, ks)
    embeds = rollout.embeds if len(ks) == 1 else rollout.embeds.repeat(len(ks))
    v = arch.velocity(model, x, t, embeds, config.guidance, config.height, config.width, dtype)
    return x, t, dt, v


def recompute_transition(
    model: nn.Module,
    arch: Architecture,
    kernel: TransitionKernel,
    rollout: Rollout,
    k: int,
    config: SamplerConfig,
    *,
    dtype: torch.dtype,
) -> KernelStep:
    """Current policy on SDE step ``k`` of ``rollout``: mean (B, ...) with grad, std (B,),
    log-prob (B,) of the recorded draw. Same batch layout and precision as the rollout;
    inputs checked by :meth:`TransitionKernel.step`."""
    x, t, dt, v = _stacked_velocity(model, arch, rollout, (k,), config, dtype)
    return kernel.step(x, v, t, dt, next_sample=rollout.next_latents[:, k])


def recompute_transitions(
    model: nn.Module,
    arch: Architecture,
    kernel: TransitionKernel,
    rollout: Rollout,
    ks: tuple[int, ...],
    config: SamplerConfig,
    *,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Current policy on SDE steps ``ks`` of ``rollout`` in one transformer call: the
    proposal means (S B, ...) with grad and the transition stds (S B,), S = ``len(ks)``,
    rows step-major (:meth:`Rollout.stacked`).

    With one step the batch layout is the rollout's (bit-identical means under unchanged
    weights). The kernel's formulas run without :meth:`TransitionKernel.step`'s value
    checks (each a device synchronisation): ``t`` and ``dt`` are the rollout's own, checked
    when it was drawn.
    """
    x, t, dt, v = _stacked_velocity(model, arch, rollout, ks, config, dtype)
    return kernel.mean(x, v, t, dt), kernel.std(t, dt)
