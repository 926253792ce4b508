r"""Sampling: time schedules, SDE rollouts through a regclip kernel, ODE evaluation.

Schedules run from ``t = 1`` (noise) to ``t = 0`` (data) in ``T`` steps. The SD3-style
shifted schedule is ``t = shift * u / (1 + (shift - 1) u)`` on a uniform grid ``u``; with
``shift = 1`` it is the uniform schedule. A rollout records, for every step, the state
``x_t``, the rollout policy's proposal mean and the draw ``x_{t+dt}``: everything
``GuardedPPOLoss`` needs to score the same transitions under the updated policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import TransitionKernel
from .nets import VelocityNet

__all__ = ["Rollout", "ode_sample", "sde_rollout", "time_schedule"]


def time_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """(T + 1,) decreasing times from 1 to 0, SD3-shifted by ``shift`` (1 = uniform)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


@dataclass(frozen=True)
class Rollout:
    """T transitions of a batch of B samples, flattened step-major to (T * B, ...)."""

    states: Tensor
    """(T*B, 1, H, W) x_t at the start of each step."""
    next_states: Tensor
    """(T*B, 1, H, W) the rollout draw x_{t+dt}."""
    old_means: Tensor
    """(T*B, 1, H, W) the rollout policy's proposal mean."""
    t: Tensor
    """(T*B,) step start times."""
    dt: Tensor
    """(T*B,) step sizes (negative)."""
    step_index: Tensor
    """(T*B,) 0..T-1."""
    labels: Tensor
    """(T*B,) class of each transition's sample."""
    final: Tensor
    """(B, 1, H, W) the generated images x_0."""


@torch.no_grad()
def sde_rollout(
    net: VelocityNet,
    kernel: TransitionKernel,
    times: Tensor,
    labels: Tensor,
    shape: tuple[int, ...],
    generator: torch.Generator,
) -> Rollout:
    """Sample ``x_1 ~ N(0, I)`` and step through ``kernel`` on ``times``; records everything."""
    device = labels.device
    x = torch.randn((len(labels), *shape), generator=generator, device=device)
    records: dict[str, list[Tensor]] = {k: [] for k in ("states", "next", "means", "t", "dt")}
    for k in range(len(times) - 1):
        t = times[k].to(device).expand(len(labels))
        dt = (times[k + 1] - times[k]).to(device).expand(len(labels))
        out = kernel.step(x, net(x, t, labels), t, dt, generator=generator)
        for key, value in zip(records, (x, out.next_sample, out.mean, t, dt), strict=True):
            records[key].append(value)
        x = out.next_sample
    steps = len(times) - 1
    return Rollout(
        states=torch.cat(records["states"]),
        next_states=torch.cat(records["next"]),
        old_means=torch.cat(records["means"]),
        t=torch.cat(records["t"]),
        dt=torch.cat(records["dt"]),
        step_index=torch.arange(steps, device=device).repeat_interleave(len(labels)),
        labels=labels.repeat(steps),
        final=x,
    )


@torch.no_grad()
def ode_sample(
    net: VelocityNet, times: Tensor, labels: Tensor, noise: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Deterministic Euler sampling ``x <- x + v dt`` from fixed ``noise`` (B, 1, H, W).

    Returns the images (B, 1, H, W) and the T states visited (for drift/KL evaluation).
    """
    x, states = noise, []
    for k in range(len(times) - 1):
        states.append(x)
        t = times[k].to(x.device).expand(len(labels))
        x = x + net(x, t, labels) * float(times[k + 1] - times[k])
    return x, states
