"""Hypothesis strategies for rollout transitions: fresh random tensors from drawn seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from regclip import TransitionKernel


@dataclass
class Rollout:
    """A batch of transitions drawn under the rollout policy, in float64."""

    sample: torch.Tensor  # (B, C, H, W) x_t
    velocity_old: torch.Tensor  # (B, C, H, W) rollout velocity
    velocity: torch.Tensor  # (B, C, H, W) current velocity (leaf with grad)
    t: torch.Tensor  # (B,)
    dt: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, C, H, W)
    advantages: torch.Tensor  # (B,)


seeds = st.integers(min_value=0, max_value=2**31 - 1)
times = st.floats(min_value=0.05, max_value=0.95)
steps = st.floats(min_value=0.01, max_value=0.2)
drifts = st.floats(min_value=1e-4, max_value=0.3)
kernel_names = st.sampled_from(["flow", "dance", "cps"])


def make_rollout(
    seed: int,
    batch: int = 6,
    shape: tuple[int, ...] = (3, 4, 4),
    t: float | torch.Tensor = 0.6,
    dt: float | torch.Tensor = -0.1,
    drift: float = 0.05,
) -> Rollout:
    """Random transitions; the current velocity differs from the rollout one by ``drift``."""
    gen = torch.Generator().manual_seed(seed)
    full = (batch, *shape)
    v_old = torch.randn(full, generator=gen, dtype=torch.float64)
    velocity = (
        v_old + drift * torch.randn(full, generator=gen, dtype=torch.float64)
    ).requires_grad_()
    return Rollout(
        sample=torch.randn(full, generator=gen, dtype=torch.float64),
        velocity_old=v_old,
        velocity=velocity,
        t=torch.as_tensor(t, dtype=torch.float64).expand(batch).clone(),
        dt=torch.as_tensor(dt, dtype=torch.float64).expand(batch).clone(),
        noise=torch.randn(full, generator=gen, dtype=torch.float64),
        advantages=torch.randn(batch, generator=gen, dtype=torch.float64),
    )


def loss_inputs(kernel: TransitionKernel, r: Rollout) -> dict[str, torch.Tensor]:
    """Keyword tensors for a loss call: old step sampled with ``r.noise``, current mean
    re-evaluated with ``r.velocity`` (differentiable)."""
    old = kernel.step(r.sample, r.velocity_old, r.t, r.dt, noise=r.noise)
    mean, std = kernel.evaluate(r.sample, r.velocity, r.t, r.dt)
    return {
        "advantages": r.advantages,
        "mean": mean,
        "old_mean": old.mean,
        "next_sample": old.next_sample,
        "std": std,
        "dt": r.dt,
        "t": r.t,
    }
