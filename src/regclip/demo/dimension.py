r"""The left shift of the vanilla ratio against the latent dimension D at fixed drift.

For each D and each step of the rollout schedule, draw ``x_next = mu_old + s eps`` and a
policy update ``Delta = c_t * delta_v * g`` (``g`` standard normal per dimension: an RMS
velocity drift ``delta_v`` the same for every D), score the transitions with the vanilla
Flow-GRPO loss and measure ``(1 - mean rho) / std rho``. Theory (DESIGN.md section 1):
``log rho = mean_D(eps Delta) / s - mean_D(Delta^2) / (2 s^2)``, whose mean over its spread
is ``sqrt(mean_D Delta^2) sqrt(D) / (2 s)``: a sqrt(D) law.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import presets
from ..kernels import FlowSDE
from .config import DemoConfig
from .rollout import time_schedule

__all__ = ["DRIFT", "left_shift_vs_dim"]

DRIFT = 0.02
"""RMS velocity drift ``delta_v`` held fixed across D."""


@torch.no_grad()
def samples_for(dim: int, elements: int = 2**23) -> int:
    """Transitions per (D, step): the measurement's standard error is ~1/sqrt(samples), so
    small D (small shift) gets many samples; capped at ``elements`` floats per batch."""
    return int(min(max(elements // dim, 256), 32_768))


def left_shift_vs_dim(
    cfg: DemoConfig, device: torch.device | None = None, drift: float = DRIFT
) -> dict[str, Any]:
    """Per D in ``cfg.dims``: measured and predicted shift ``(1 - mean rho) / std rho`` per
    step of ``cfg``'s schedule, the mean over steps, and the exponent alpha of
    shift ~ D^alpha fitted by least squares in log-log (0.5 expected)."""
    device = device or torch.device("cpu")
    gen = torch.Generator(device).manual_seed(2024)
    times = time_schedule(cfg.num_steps, cfg.shift)
    kernel = FlowSDE.from_sigmas(times, cfg.flow_eta)
    loss_fn = presets.flow_grpo()
    per_dim: dict[str, Any] = {
        "dims": list(cfg.dims),
        "measured": [],
        "predicted": [],
        "t": times[:-1].tolist(),
    }
    for dim in cfg.dims:
        measured, predicted = [], []
        samples = samples_for(dim)
        for k in range(cfg.num_steps):
            t = times[k].expand(samples).to(device)
            dt = (times[k + 1] - times[k]).expand(samples).to(device)
            std = kernel.std(t, dt)
            slope = kernel.velocity_slope(t, dt)
            old_mean = torch.zeros(samples, dim, device=device)
            delta = slope[:, None] * drift * torch.randn(samples, dim, generator=gen, device=device)
            noise = torch.randn(samples, dim, generator=gen, device=device)
            out = loss_fn(
                advantages=torch.ones(samples, device=device),
                mean=old_mean + delta,
                old_mean=old_mean,
                next_sample=old_mean + std[:, None] * noise,
                std=std,
                dt=dt,
            )
            ratio = out.ratio.double()
            measured.append(float((1 - ratio.mean()) / ratio.std()))
            predicted.append(float(slope[0].abs() * drift * math.sqrt(dim) / (2 * std[0])))
        per_dim["measured"].append(measured)
        per_dim["predicted"].append(predicted)
    means = [sum(m) / len(m) for m in per_dim["measured"]]
    log_d = torch.tensor([math.log(d) for d in cfg.dims], dtype=torch.float64)
    log_z = torch.tensor([math.log(max(m, 1e-12)) for m in means], dtype=torch.float64)
    centred = log_d - log_d.mean()
    per_dim["mean_over_steps"] = means
    per_dim["fitted_exponent"] = float(
        (centred * (log_z - log_z.mean())).sum() / (centred**2).sum()
    )
    per_dim["drift"] = drift
    per_dim["samples"] = [samples_for(dim) for dim in cfg.dims]
    return per_dim
