r"""Sampling for an ensemble: time schedules, SDE rollouts through a regclip kernel, ODE samples.

Schedules run from ``t = 1`` (noise) to ``t = 0`` (data) in ``T`` steps. The SD3-style
shifted schedule is ``t = shift * u / (1 + (shift - 1) u)`` on a uniform grid ``u``. A
rollout records, for every member and step, the state ``x_t``, the draw ``x_{t+dt}`` and the
standard normal noise of the draw: with the rollout policy's mean re-scored in the training
pass's layout (:func:`score`), that is everything ``GuardedPPOLoss`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import TransitionKernel
from .nets import EnsembleMixer

__all__ = ["Rollout", "ode_sample", "score", "sde_rollout", "time_schedule"]


def time_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """(T + 1,) decreasing times from 1 to 0, SD3-shifted by ``shift`` (1 = uniform)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


@dataclass(frozen=True)
class Rollout:
    """T transitions of B samples per member, flattened step-major to (E, T * B, ...)."""

    states: Tensor
    """(E, T*B, 1, S, S) x_t at the start of each step."""
    next_states: Tensor
    """(E, T*B, 1, S, S) the rollout draw x_{t+dt}."""
    t: Tensor
    """(T*B,) step start times (shared by the members)."""
    dt: Tensor
    """(T*B,) step sizes (negative)."""
    step_index: Tensor
    """(T*B,) 0..T-1."""
    final: Tensor
    """(E, B, 1, S, S) the generated samples x_0."""


@torch.no_grad()
def sde_rollout(
    net: EnsembleMixer,
    kernel: TransitionKernel,
    times: Tensor,
    batch: int,
    generators: list[torch.Generator],
) -> Rollout:
    """``batch`` samples per member from ``x_1 ~ N(0, I)`` through ``kernel`` on ``times``;
    member ``e`` draws all its noise from ``generators[e]``."""
    device = next(net.parameters()).device
    members, size = net.members, net.size
    shape = (batch, 1, size, size)

    def normal() -> Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])

    x = normal()
    states, nexts, ts, dts = [], [], [], []
    for k in range(len(times) - 1):
        t = times[k].to(device).expand(batch)
        dt = (times[k + 1] - times[k]).to(device).expand(batch)
        velocity = net(x, t.expand(members, batch))
        flat = (members * batch, 1, size, size)
        mean, std = kernel.evaluate(
            x.reshape(flat), velocity.reshape(flat), t.repeat(members), dt.repeat(members)
        )
        x_next = (mean + std.view(-1, 1, 1, 1) * normal().reshape(flat)).view_as(x)
        states.append(x)
        nexts.append(x_next)
        ts.append(t)
        dts.append(dt)
        x = x_next
    steps = len(times) - 1
    return Rollout(
        states=torch.cat(states, dim=1),
        next_states=torch.cat(nexts, dim=1),
        t=torch.cat(ts),
        dt=torch.cat(dts),
        step_index=torch.arange(steps, device=device).repeat_interleave(batch),
        final=x,
    )


def score(net: EnsembleMixer, kernel: TransitionKernel, roll: Rollout) -> tuple[Tensor, Tensor]:
    """Every rollout transition under ``net``: means (E, T*B, 1, S, S) and stds (T*B,).

    Runs in one layout for the rollout's re-scoring and every training pass, so the first
    pass's ratio is exactly 1.
    """
    members, n = roll.states.shape[:2]
    velocity = net(roll.states, roll.t.expand(members, n))
    flat = (members * n, *roll.states.shape[2:])
    mean, std = kernel.evaluate(
        roll.states.reshape(flat),
        velocity.reshape(flat),
        roll.t.repeat(members),
        roll.dt.repeat(members),
    )
    return mean.view_as(roll.states), std[:n]


@torch.no_grad()
def ode_sample(net: EnsembleMixer, times: Tensor, noise: Tensor) -> Tensor:
    """Euler sampling ``x <- x + v dt`` of every member from the same noise (M, 1, S, S);
    returns (E, M, 1, S, S)."""
    x = noise.expand(net.members, *noise.shape).contiguous()
    for k in range(len(times) - 1):
        t = times[k].to(x.device).expand(x.shape[:2])
        x = x + net(x, t) * float(times[k + 1] - times[k])
    return x
