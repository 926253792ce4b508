r"""``GRPOTrainer``: GRPO fine-tuning of a diffusers SD3 / Flux transformer with regclip.

One iteration:

1. **Rollout.** ``prompts_per_iteration`` prompts, ``group_size`` samples each, split
   across ranks and into batches of ``batch_size``; each batch is one
   :func:`~regclip.trainer.rollout.sample_rollout` (no grad).
2. **Reward.** Final latents -> VAE decode (or the latents themselves without a VAE) ->
   ``reward(images, prompts)`` -> per-prompt group advantages
   (:func:`regclip.group_advantages`, gathered over ranks).
3. **Update.** For each pass, each rollout batch and each chunk of
   ``timesteps_per_call`` consecutive recorded SDE steps: recompute the proposal means of
   the chunk in one transformer call
   (:func:`~regclip.trainer.rollout.recompute_transitions`), call the preset's
   :class:`regclip.GuardedPPOLoss` on the stacked rows, backward. Gradients accumulate
   over all chunks of ``accumulate_batches`` batches (accelerate's gradient accumulation,
   which divides the loss by that count), then clip, optimizer step, EMA step.

   The gradient does not depend on the chunking: the loss is a mean of per-row terms, so
   chunk ``c`` (``n_c`` of the ``K`` steps) scaled by ``C n_c / K`` (``C`` chunks) and
   divided by accelerate's ``A C`` adds ``sum_{k in c} L_k / (A K)``, the per-step loop's
   share. Presets whose loss couples the rows of a batch (batch-mean ratio scale or
   weight) are refused with ``timesteps_per_call > 1``.

On CUDA the update reads nothing back to the host until its end (loss metrics and
gradient norms accumulate on the device; one transfer), the loss runs on the fused
Triton backend where the preset allows it (:mod:`regclip.fused`), and AdamW uses its
fused kernel. The loss is built with ``validate=False``: its inputs come from the
trainer's own rollout, and the value checks would synchronise on every call.

Multi-GPU runs go through ``accelerate launch`` (DDP); nothing here is device-specific.
The rollout uses the unwrapped model under ``accelerator.autocast()``; accelerate applies
the same autocast to the prepared model, so both passes compute in the same precision.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..adaptive import AdaptiveClip
from ..advantages import group_advantages
from ..diagnostics import TimestepDiagnostics
from ..kernels import FlowSDE, TransitionKernel, make_kernel
from ..loss import GuardedPPOLoss
from ..loss_config import LossConfig
from ..output import LossOutput
from ..ratio import BatchRatioNorm
from ..reweight import BatchInverseDtWeight
from .arch import Guidance, model_config
from .build import Components, dtype_from_name
from .checkpoint import (
    CHECKPOINTS,
    check_config,
    find_checkpoint,
    trim_metrics,
    write_checkpoint,
)
from .config import TrainConfig
from .rollout import Rollout, SamplerConfig, recompute_transitions, sample_rollout

__all__ = [
    "GRPOTrainer",
    "build_kernel",
    "build_loss",
    "compile_blocks",
    "decode_images",
    "select_trainable",
    "timestep_chunks",
    "transformer_scope",
]


def build_kernel(sde: str, eta: float | None, sigmas: Tensor) -> TransitionKernel:
    """The transition kernel; a Flow-SDE gets the schedule's ``sigma_max`` (for t = 1)."""
    if sde == "flow":
        return FlowSDE.from_sigmas(sigmas, 0.7 if eta is None else eta)
    return make_kernel(sde, eta)


def build_loss(
    preset: str,
    kernel: TransitionKernel,
    sde: str,
    *,
    clip_range: float | None = None,
    adv_clip: float | None = 5.0,
    kl_coef: float = 0.0,
    times: Tensor | None = None,
    fused: bool = False,
    validate: bool = True,
) -> GuardedPPOLoss:
    """The preset's loss through :meth:`GuardedPPOLoss.from_config`, with the trainer's
    kernel (presets that use none ignore it) and sampling schedule ``times`` (each step's
    start time, ``sigmas[:-1]``; read by ``adaptive_guard``). ``fused`` asks for the fused
    backend (an error when the preset can never run there); ``validate=False`` skips the
    per-call value checks (each one a device synchronisation)."""
    config = LossConfig(
        preset,
        clip_range=clip_range,
        adv_clip=adv_clip,
        kl_coef=kl_coef,
        sde=sde,  # type: ignore[arg-type]
        fused=fused,
    )
    return GuardedPPOLoss.from_config(config, kernel, times=times, validate=validate)


def fused_applies(loss: GuardedPPOLoss, device: torch.device) -> bool:
    """Whether ``loss`` can run on the fused Triton backend on ``device`` (CUDA with Triton,
    and a preset the backend runs)."""
    if device.type != "cuda":
        return False
    from ..fused import is_available, static_blocker

    return bool(is_available(device)) and static_blocker(loss) is None


def timestep_chunks(num_steps: int, per_call: int) -> list[tuple[int, ...]]:
    """The K = ``num_steps`` SDE step indices in consecutive chunks of ``per_call``
    (the last one shorter when ``per_call`` does not divide K)."""
    if per_call < 1:
        raise ValueError(f"`timesteps_per_call` must be >= 1, got {per_call}")
    return [tuple(range(s, min(s + per_call, num_steps))) for s in range(0, num_steps, per_call)]


def couples_rows(loss: GuardedPPOLoss) -> str | None:
    """Which part of ``loss`` mixes the rows of a batch (so stacking timesteps would change
    the gradient), or None."""
    for part in (loss.normalizer, loss.reweighter):
        if isinstance(part, BatchRatioNorm | BatchInverseDtWeight):
            return type(part).__name__
    return None


@torch.no_grad()
def decode_images(vae: Any, latents: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [0, 1].

    Undoes the pipelines' latent normalisation, ``z / scaling_factor + shift_factor``.
    """
    cfg = vae.config
    z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def select_trainable(transformer: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """Freeze ``transformer`` and return what trains: a fresh float32 LoRA adapter
    (peft, via diffusers' ``add_adapter``; B = 0 so the policy starts at the base model;
    A drawn from ``config.seed``)
    or, with ``config.full_finetune``, every transformer weight."""
    transformer.requires_grad_(config.full_finetune)
    if not config.full_finetune:
        from peft import LoraConfig

        with torch.random.fork_rng(devices=[]):  # seeded adapter, caller's RNG untouched
            torch.manual_seed(_seed(config.seed, 4))
            transformer.add_adapter(  # type: ignore[operator]
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(config.lora_targets),
                )
            )
        for param in transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return [p for p in transformer.parameters() if p.requires_grad]


def compile_blocks(transformer: nn.Module, names: tuple[str, ...], **options: Any) -> int:
    """``torch.compile`` each submodule of ``transformer`` whose class is named in ``names``
    (regional compilation: the blocks of one variant share one graph, so a 24-block model
    compiles a few graphs instead of one large one). ``options`` go to ``torch.compile``.
    Returns how many blocks were compiled; an error when none matched."""
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"no {' or '.join(names)} block in {type(transformer).__name__}")
    for block in blocks:
        block.compile(**options)
    return len(blocks)


RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled code inside the trainer's scope. The blocks of a
model share one code object, and each block variant (dual attention, context-pre-only, the
first block's input layout), grad mode, KL reference pass and new shape adds a graph:
past torch's default of 8, the rest would run eagerly."""


def transformer_scope(*, cudnn: bool, compiled: bool) -> contextlib.ExitStack:
    """The scope of the trainer's transformer calls and backward passes (a backward may
    rerun a checkpointed forward).

    * ``cudnn=False``: scaled-dot-product attention may use the backends the caller has on,
      except cuDNN.
    * ``compiled``: dynamo keeps up to :data:`RECOMPILE_LIMIT` graphs per block code and
      raises past it instead of silently running the block eagerly.

    Both settings are scoped: outside it the process-wide ones are as the caller set them.
    """
    stack = contextlib.ExitStack()
    if not cudnn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        flags = {
            SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
            SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
            SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
        }
        stack.enter_context(sdpa_kernel([b for b, on in flags.items() if on]))
    if compiled:
        stack.enter_context(
            torch._dynamo.config.patch(
                recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
            )
        )
    return stack


def _seed(*keys: int) -> int:
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0] % (2**63))


def _detached(out: LossOutput) -> LossOutput:
    """The per-sample values of ``out`` without its autograd graph (for diagnostics read
    after the update)."""
    return replace(
        out,
        loss=out.loss.detach(),
        log_ratio=out.log_ratio.detach(),
        ratio=out.ratio.detach(),
        weight=out.weight.detach(),
        advantages=out.advantages.detach(),
        compute_metric_tensors=dict,
    )


class GRPOTrainer:
    """See the module docstring. Build with :func:`regclip.trainer.build_components`."""

    def __init__(
        self, config: TrainConfig, components: Components, accelerator: Any = None
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.arch = components.arch
        self.prompts = components.prompts
        self.reward_fn = components.reward
        self.sampler = SamplerConfig(
            num_steps=config.num_steps,
            sde_steps=None if config.sde_steps is None else tuple(config.sde_steps),
            height=config.resolution,
            width=config.resolution,
            guidance=Guidance(config.cfg_scale, config.embedded_guidance),
            store_old_means=config.store_old_means,
        )
        self.chunks = timestep_chunks(len(self.sampler.trained_steps), config.timesteps_per_call)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.accumulate_batches * len(self.chunks),
            cpu=config.device == "cpu",
        )
        self.device = self.accelerator.device
        self.input_dtype = dtype_from_name(config.weight_dtype)

        transformer = components.transformer
        self.lora = not config.full_finetune
        self.trainable = select_trainable(transformer, config)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()  # type: ignore[operator]
        transformer.to(self.device)
        if config.compile_transformer:
            compile_blocks(transformer, self.arch.repeated_blocks)
        optimizer = torch.optim.AdamW(
            self.trainable,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.model, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        self.embeds = self.prompts.embeds.to(self.device, self.input_dtype)  # moved once
        self.vae = components.vae
        if self.vae is not None:
            self.vae.requires_grad_(False).to(self.device)

        self.sigmas = self.arch.sigmas(
            self.arch.make_scheduler(), config.num_steps, config.resolution, config.resolution
        )
        self.kernel = build_kernel(config.sde, config.eta, self.sigmas)
        self.loss_fn = build_loss(
            config.preset,
            self.kernel,
            config.sde,
            clip_range=config.clip_range,
            adv_clip=config.adv_clip,
            kl_coef=config.kl_coef,
            times=self.sigmas[:-1],
            validate=False,
        )
        self.loss_fn.fused = fused_applies(self.loss_fn, self.device)
        coupled = couples_rows(self.loss_fn)
        if config.timesteps_per_call > 1 and coupled is not None:
            raise ValueError(
                f"`timesteps_per_call` must be 1 with preset {config.preset!r}: its "
                f"{coupled} mixes the rows of a batch, so stacked timesteps change the gradient"
            )
        if config.timesteps_per_call > 1 and config.compile_transformer:
            warnings.warn(
                "timesteps_per_call > 1 with compile_transformer: in the H100 benchmark "
                "(docs/performance.md) 3 stacked steps made the compiled step 1.56x slower and "
                "clipped 1/6 of a fresh rollout's rows by rounding alone; use 1",
                stacklevel=2,
            )
        self.ema = None
        if config.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=config.ema_decay)
        self.diagnostics = TimestepDiagnostics()
        self.iteration = 0
        self.output_dir = Path(config.output_dir)

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped(self) -> nn.Module:
        model: nn.Module = self.accelerator.unwrap_model(self.model)
        return model

    def scope(self) -> contextlib.ExitStack:
        """:func:`transformer_scope` for this trainer's settings."""
        cfg = self.config
        return transformer_scope(cudnn=cfg.cudnn_attention, compiled=cfg.compile_transformer)

    def _generator(self, *keys: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_seed(self.config.seed, *keys))

    def sample_prompt_ids(self) -> Tensor:
        """(N_rank,) prompt index of this rank's samples in the current iteration.

        Chosen with a generator shared by all ranks, so group ids agree across ranks.
        """
        cfg = self.config
        g = torch.Generator().manual_seed(_seed(cfg.seed, self.iteration, 1))
        n, p = len(self.prompts), cfg.prompts_per_iteration
        chosen = (
            torch.randperm(n, generator=g)[:p] if p <= n else torch.randint(n, (p,), generator=g)
        )
        ids = chosen.repeat_interleave(cfg.group_size)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = len(ids) // world
        if (
            len(ids) % world
            or per_rank % cfg.batch_size
            or (per_rank // cfg.batch_size) % cfg.accumulate_batches
        ):
            raise ValueError(
                f"prompts_per_iteration * group_size = {len(ids)} must split into {world} rank(s) "
                f"x whole batches of {cfg.batch_size} x accumulate_batches {cfg.accumulate_batches}"
            )
        return ids[rank * per_rank : (rank + 1) * per_rank]

    # ------------------------------------------------------------------ phases
    def rollout(self) -> tuple[list[Rollout], Tensor]:
        """Sample this rank's rollouts, score them, fill in their advantages.

        Returns the rollouts and this rank's rewards (N_rank,).
        """
        rollouts = self.sample()
        return rollouts, self.reward(rollouts)

    def sample(self) -> list[Rollout]:
        """This rank's rollouts of the current iteration (no rewards yet), in batches of
        ``batch_size``."""
        ids = self.sample_prompt_ids()
        model = self.unwrapped
        channels = int(model_config(model).in_channels)
        rollouts = []
        rank = self.accelerator.process_index
        for b, start in enumerate(range(0, len(ids), self.config.batch_size)):
            batch_ids = ids[start : start + self.config.batch_size]
            embeds = self.embeds.select(batch_ids)
            with self.accelerator.autocast(), self.scope():
                rollouts.append(
                    sample_rollout(
                        model,
                        self.arch,
                        self.kernel,
                        self.sigmas,
                        embeds,
                        batch_ids,
                        self.sampler,
                        self._generator(self.iteration, rank, b, 2),
                        dtype=self.input_dtype,
                        device=self.device,
                        channels=channels,
                    )
                )
        return rollouts

    def reward(self, rollouts: list[Rollout]) -> Tensor:
        """Score ``rollouts`` (:meth:`score`), set their group advantages, and return this
        rank's rewards (N_rank,)."""
        rewards = torch.cat([self.score(r) for r in rollouts])
        ids = torch.cat([r.prompt_ids for r in rollouts])
        std: Any = self.config.advantage_std
        advantages = group_advantages(rewards, ids.to(rewards.device), std=std)
        for r, adv in zip(rollouts, advantages.split(self.config.batch_size), strict=True):
            r.advantages = adv.to(self.device)
        return rewards

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Tensor:
        """(B,) rewards of a rollout's final samples (decoded when there is a VAE)."""
        latents = self.arch.to_image_latents(
            rollout.final, self.config.resolution, self.config.resolution
        )
        images = latents if self.vae is None else decode_images(self.vae, latents)
        texts = [self.prompts.texts[int(i)] for i in rollout.prompt_ids]
        rewards = torch.as_tensor(self.reward_fn(images, texts), dtype=torch.float32)
        return rewards.reshape(-1).to(self.device)

    def transition_loss(self, rollout: Rollout, k: int) -> LossOutput:
        """The preset's loss on SDE step ``k`` of ``rollout`` (current policy, with grad)."""
        return self.transitions_loss(rollout, (k,))

    def transitions_loss(self, rollout: Rollout, ks: tuple[int, ...]) -> LossOutput:
        """The preset's loss on SDE steps ``ks`` of ``rollout``, stacked into one batch of
        ``len(ks) * B`` rows (one transformer call; rows as
        :func:`~regclip.trainer.rollout.recompute_transitions` orders them)."""
        if rollout.advantages is None:
            raise ValueError("the rollout has no advantages: run `rollout()` first")
        with self.scope():
            mean, std = recompute_transitions(
                self.model,
                self.arch,
                self.kernel,
                rollout,
                ks,
                self.sampler,
                dtype=self.input_dtype,
            )
            extra = {}
            if self.config.kl_coef > 0:
                extra["ref_mean"] = self._reference_mean(rollout, ks)
        if rollout.old_means is not None:
            old_mean = rollout.stacked(rollout.old_means, ks)
        else:
            old_mean = torch.cat([rollout.old_mean(k) for k in ks])
        return self.loss_fn(
            advantages=rollout.advantages.repeat(len(ks)),
            mean=mean,
            old_mean=old_mean,
            next_sample=rollout.stacked(rollout.next_latents, ks),
            std=std,
            dt=rollout.per_row(rollout.dt, ks),
            t=rollout.per_row(rollout.t, ks),
            **extra,
        )

    @torch.no_grad()
    def _reference_mean(self, rollout: Rollout, ks: tuple[int, ...]) -> Tensor:
        if not self.lora:
            raise ValueError(
                "the KL term needs a reference model: use LoRA (the adapter-free base)"
            )
        model = self.unwrapped
        model.disable_adapters()  # type: ignore[operator]
        try:
            with self.accelerator.autocast():
                ref_mean, _ = recompute_transitions(
                    model, self.arch, self.kernel, rollout, ks, self.sampler, dtype=self.input_dtype
                )
        finally:
            model.enable_adapters()  # type: ignore[operator]
        return ref_mean

    def update(self, rollouts: list[Rollout]) -> dict[str, float]:
        """All optimizer passes over ``rollouts``; returns mean loss metrics and grad norm.

        The passes (:meth:`accumulate`) read nothing on the host; the metrics come back in
        one transfer and the per-timestep diagnostics are fed after the last pass.
        """
        sums, norms, outputs, steps = self.accumulate(rollouts)
        names = list(sums)
        values = [sums[n] for n in names]
        if norms:
            names.append("grad_norm")
            values.append(torch.stack(norms).mean())
        metrics = dict(zip(names, torch.stack(values).tolist(), strict=True)) if values else {}
        metrics["optimizer_steps"] = float(steps)
        for step_ids, out in outputs:
            self.diagnostics.update(step_ids, out)
        return metrics

    def accumulate(
        self, rollouts: list[Rollout]
    ) -> tuple[dict[str, Tensor], list[Tensor], list[tuple[Tensor, LossOutput]], int]:
        """The optimizer passes, without one host read of a device value.

        Returns the loss metrics averaged over all trained (sample, step) pairs (0-d device
        tensors), the gradient norm of each optimizer step, each loss call's detached
        output with its rows' step indices (CPU), and the number of optimizer steps.
        """
        self.model.train()
        with self.scope():  # backward passes too: checkpointing reruns forwards in them
            return self._passes(rollouts)

    def _passes(
        self, rollouts: list[Rollout]
    ) -> tuple[dict[str, Tensor], list[Tensor], list[tuple[Tensor, LossOutput]], int]:
        """:meth:`accumulate`'s loop."""
        sums: dict[str, Tensor] = {}
        norms: list[Tensor] = []
        outputs: list[tuple[Tensor, LossOutput]] = []
        steps = 0
        order = np.random.default_rng(_seed(self.config.seed, self.iteration, 3))
        num_sde = len(self.sampler.trained_steps)
        scale = [len(self.chunks) * len(ks) / num_sde for ks in self.chunks]
        for _ in range(self.config.passes):
            for b in order.permutation(len(rollouts)):
                rollout = rollouts[int(b)]
                for ks, factor in zip(self.chunks, scale, strict=True):
                    with self.accelerator.accumulate(self.model):
                        out = self.transitions_loss(rollout, ks)
                        loss = out.loss if factor == 1 else out.loss * factor
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients:
                            norm = self.accelerator.clip_grad_norm_(
                                self.trainable, self.config.max_grad_norm
                            )
                            if norm is not None:
                                norms.append(torch.as_tensor(norm).detach().float())
                            steps += 1
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    if self.accelerator.sync_gradients and self.ema is not None:
                        self.ema.step(self.trainable)
                    if self.accelerator.sync_gradients and isinstance(
                        self.loss_fn.surrogate, AdaptiveClip
                    ):  # adaptive_guard: update the per-step ranges once per optimizer step
                        self.loss_fn.surrogate.step()
                    share = len(ks) / (num_sde * self.config.passes * len(rollouts))
                    for name, value in out.metric_tensors.items():
                        value = value.detach().float() * share
                        sums[name] = sums[name] + value if name in sums else value
                    step_ids = rollout.steps[list(ks)].repeat_interleave(rollout.batch_size)
                    outputs.append((step_ids, _detached(out)))
        return sums, norms, outputs, steps

    def train_iteration(self) -> dict[str, Any]:
        """Rollout + update; returns the iteration's metrics (and per-step diagnostics)."""
        start = time.perf_counter()
        self.diagnostics.reset()
        rollouts, rewards = self.rollout()
        rollout_time = time.perf_counter() - start
        metrics: dict[str, Any] = self.update(rollouts)
        all_rewards = self.accelerator.gather(rewards)
        metrics.update(
            {
                "reward/mean": float(all_rewards.mean()),
                "reward/std": float(all_rewards.std(unbiased=False)),
                "time/rollout": rollout_time,
                "time/iteration": time.perf_counter() - start,
            }
        )
        self.iteration += 1
        metrics["iteration"] = self.iteration
        metrics["timesteps"] = {str(k): v for k, v in self.diagnostics.summary().items()}
        return metrics

    def fit(self, iterations: int | None = None) -> list[dict[str, Any]]:
        """Train to ``iterations`` (default ``config.iterations``) with a progress bar,
        logging JSON lines to ``output_dir/metrics.jsonl`` and checkpointing."""
        from tqdm.auto import tqdm

        total = self.config.iterations if iterations is None else iterations
        history = []
        main = self.accelerator.is_main_process
        log_path = self.output_dir / "metrics.jsonl"
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        progress = tqdm(range(self.iteration, total), disable=not main, desc="regclip train")
        if self.config.compile_transformer and total > self.iteration:
            progress.write("regclip train: the first iteration compiles the transformer blocks")
        for _ in progress:
            metrics = self.train_iteration()
            history.append(metrics)
            if main:
                with log_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                progress.set_postfix(
                    reward=f"{metrics['reward/mean']:.4g}",
                    clip=f"{metrics.get('clip/frac', 0):.3f}",
                    shift_z=f"{metrics.get('log_ratio/shift_z', 0):.2f}",
                )
            every = self.config.checkpoint_every
            if every and (self.iteration % every == 0 or self.iteration == total):
                self.save_checkpoint()
        return history

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINTS / f"iter_{self.iteration:06d}"

    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Trainable weights, optimizer, EMA, the loss's state (adaptive clip ranges),
        iteration and config to
        ``directory/trainer_state.pt`` (plus the LoRA adapter in diffusers format under
        ``directory/lora``), written atomically (:func:`.checkpoint.write_checkpoint`)."""
        path = Path(directory) if directory is not None else self.checkpoint_dir()
        if self.accelerator.is_main_process:
            model = self.unwrapped
            state = {
                "trainable": {
                    n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad
                },
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "loss": {k: v.cpu() for k, v in self.loss_fn.state_dict().items()},
                "iteration": self.iteration,
                "config": self.config.to_dict(),
            }

            def write_lora(folder: Path) -> None:
                model.save_lora_adapter(folder / "lora")  # type: ignore[operator]

            write_checkpoint(path, state, write_lora if self.lora else None)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from a :meth:`save_checkpoint` folder, or ``"latest"``: the newest readable
        one in output_dir (newer unreadable ones are skipped with a warning). Refuses a
        checkpoint whose config differs from this run's (:func:`.checkpoint.check_config`)."""
        found = find_checkpoint(directory, self.output_dir)
        for line in found.skipped:
            warnings.warn(line, stacklevel=2)
        check_config(found, self.config)
        self.restore(found.state)

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's state (:attr:`.checkpoint.Checkpoint.state`) and drop the
        metrics logged after it."""
        params = dict(self.unwrapped.named_parameters())
        missing = set(state["trainable"]) ^ {n for n, p in params.items() if p.requires_grad}
        if missing:
            raise ValueError(
                f"checkpoint and model disagree on trainable parameters: {sorted(missing)[:5]}"
            )
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        if "loss" in state:  # the adaptive controller's ranges and counts
            self.loss_fn.load_state_dict(state["loss"])
        self.iteration = int(state["iteration"])
        if self.accelerator.is_main_process:
            trim_metrics(self.output_dir / "metrics.jsonl", self.iteration)
