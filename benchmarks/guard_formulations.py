r"""The losses the benchmarks compare, forward + backward, on one batch of transitions.

* ``vanilla``   -- Flow-GRPO as ``train_sd3.py`` writes it: one Gaussian log-prob pass over
  the latent (``-(x - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)``, averaged over dims), the
  stored rollout log-prob, ``rho = exp(lp - old_lp)``, PPO clip.
* ``public``    -- GRPO-Guard as the public trainers write it (verl-omni ``GRPOGuardLoss``
  formulas, re-written here): log-prob passes under the current and the old mean, a
  mean-difference pass for ``b_t = mean_D(Delta^2) / (2 s^2)``,
  ``rho = exp((lp - old_lp + b_t) s)`` with batch-mean ``sigma_t`` and ``sqrt(-dt)``, PPO clip,
  loss divided by ``-dt``.
* ``eager``     -- :func:`regclip.presets.grpo_guard` (``validate=False``, the training-loop
  setting: no value checks, no device synchronisation). Its metrics are computed only when
  ``out.metrics`` is read, which this benchmark does not do (a run that logs them pays for
  about 40 small reductions more; the fused path computes them in-kernel either way).
* ``fused``     -- the same loss with ``fused=True`` (Triton on CUDA; eager fallback on CPU).
* ``fused_noise`` -- fused, old means regenerated from the rollout noise (nothing stored).

Every function takes :class:`Transitions` and returns the gradient with respect to ``mean``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from regclip import presets

CLIP_VANILLA = 1e-4
CLIP_GUARD = 2e-6
ADV_CLIP = 5.0

# name -> (batch, latent shape without batch): the SD3.5-M, Flux (packed) and Wan shapes
GPU_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "sd35m_512": (8, (16, 64, 64)),
    "sd35m_1024": (8, (16, 128, 128)),
    "flux_512": (8, (1024, 64)),
    "flux_1024": (8, (4096, 64)),
    "wan_480p_81f": (2, (16, 21, 60, 104)),
}
CPU_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "sd35m_512": (2, (16, 8, 8)),
    "sd35m_1024": (2, (16, 16, 16)),
    "flux_512": (2, (64, 64)),
    "flux_1024": (2, (256, 64)),
    "wan_480p_81f": (1, (16, 3, 6, 8)),
}


@dataclass
class Transitions:
    """One trained step of a batch of rollouts, all samples at the same timestep."""

    mean: Tensor  # (B, ...) current proposal mean, leaf with grad
    old_mean: Tensor  # (B, ...)
    noise: Tensor  # (B, ...) rollout draw: next_sample = old_mean + std * noise
    next_sample: Tensor  # (B, ...)
    old_log_prob: Tensor  # (B,) stored rollout log-prob (upstream convention)
    advantages: Tensor  # (B,)
    sigma: Tensor  # (B,) sigma_t (upstream std_dev_t, without sqrt(-dt))
    dt: Tensor  # (B,) negative

    @property
    def std(self) -> Tensor:
        """(B,) the transition std s_t = sigma_t sqrt(-dt)."""
        return self.sigma * torch.sqrt(-self.dt)


def make_transitions(
    batch: int, shape: tuple[int, ...], device: str | torch.device, generator: torch.Generator
) -> Transitions:
    """Random transitions at t = 0.5 of a 10-step schedule (eta 0.7); the policy moved by
    1e-4 s per dim, so the ratios stay inside the clip ranges (every sample has a gradient)."""
    kw = dict(device=device, generator=generator)
    full = (batch, *shape)
    old_mean = torch.randn(full, **kw)
    noise = torch.randn(full, **kw)
    dt = torch.full((batch,), -0.1, device=device)
    sigma = torch.full((batch,), 0.7, device=device)  # eta sqrt(t / (1 - t)) at t = 0.5
    std = sigma * torch.sqrt(-dt)
    per = (batch,) + (1,) * len(shape)
    next_sample = old_mean + std.view(per) * noise
    mean = (old_mean + 1e-4 * std.view(per) * torch.randn(full, **kw)).requires_grad_()
    old_log_prob = upstream_log_prob(
        next_sample, old_mean, sigma.view(per), torch.sqrt(-dt).view(per)
    )
    return Transitions(
        mean=mean, old_mean=old_mean, noise=noise, next_sample=next_sample,
        old_log_prob=old_log_prob.detach(), advantages=torch.randn(batch, **kw), sigma=sigma, dt=dt,
    )  # fmt: skip


def upstream_log_prob(next_sample: Tensor, mean: Tensor, sigma: Tensor, sqrt_dt: Tensor) -> Tensor:
    """Flow-GRPO's ``sde_step_with_logprob`` log-prob, averaged over non-batch dims."""
    std = sigma * sqrt_dt
    log_prob = (
        -((next_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _ppo(ratio: Tensor, advantages: Tensor, clip: float) -> Tensor:
    advantages = torch.clamp(advantages, -ADV_CLIP, ADV_CLIP)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped)


def vanilla(tr: Transitions) -> Tensor:
    per = (-1,) + (1,) * (tr.mean.ndim - 1)
    log_prob = upstream_log_prob(
        tr.next_sample, tr.mean, tr.sigma.view(per), torch.sqrt(-tr.dt).view(per)
    )
    loss = torch.mean(_ppo(torch.exp(log_prob - tr.old_log_prob), tr.advantages, CLIP_VANILLA))
    return torch.autograd.grad(loss, tr.mean)[0]


def public(tr: Transitions) -> Tensor:
    per = (-1,) + (1,) * (tr.mean.ndim - 1)
    std_dev_t, sqrt_dt = tr.sigma.view(per), torch.sqrt(-tr.dt)
    log_prob = upstream_log_prob(tr.next_sample, tr.mean, std_dev_t, sqrt_dt.view(per))
    old_log_prob = upstream_log_prob(tr.next_sample, tr.old_mean, std_dev_t, sqrt_dt.view(per))
    sigma_t, sqrt_dt_mean = std_dev_t.mean(), sqrt_dt.mean()
    scale = sqrt_dt_mean * sigma_t
    mean_diff_sq = (tr.mean - tr.old_mean).pow(2).mean(dim=tuple(range(1, tr.mean.ndim)))
    bias = mean_diff_sq / (2 * scale**2)
    ratio = torch.exp((log_prob - old_log_prob + bias) * scale)
    loss = torch.mean(_ppo(ratio, tr.advantages, CLIP_GUARD)) / sqrt_dt_mean**2
    return torch.autograd.grad(loss, tr.mean)[0]


def _regclip(fused: bool, use_noise: bool) -> Callable[[Transitions], Tensor]:
    loss_fn = presets.grpo_guard(sde="flow", clip_range=CLIP_GUARD, adv_clip=ADV_CLIP)
    loss_fn.validate = False
    loss_fn.fused = fused

    def run(tr: Transitions) -> Tensor:
        old = dict(noise=tr.noise) if use_noise else dict(old_mean=tr.old_mean)
        out = loss_fn(
            advantages=tr.advantages,
            mean=tr.mean,
            next_sample=tr.next_sample,
            std=tr.std,
            dt=tr.dt,
            **old,
        )
        return torch.autograd.grad(out.loss, tr.mean)[0]

    return run


FORMULATIONS: dict[str, Callable[[Transitions], Tensor]] = {
    "vanilla": vanilla,
    "public": public,
    "eager": _regclip(fused=False, use_noise=False),
    "fused": _regclip(fused=True, use_noise=False),
    "fused_noise": _regclip(fused=True, use_noise=True),
}
