"""The fused guard loss as a ``torch.autograd.Function`` around the Triton kernels.

Shapes: ``mean``, ``other`` (the old mean, or the rollout noise when ``noise=True``) and
``next_sample`` are ``(B, ...)`` and are read as ``(B, D)`` rows; ``std``, ``scale``,
``weight``, ``advantages`` are float32 ``(B,)``. Only ``mean`` receives a gradient.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..diagnostics import METRIC_NAMES
from ..surrogate import MAX_LOG_RATIO

__all__ = ["STAT_NAMES", "SurrogateConfig", "fused_guard"]

STAT_NAMES: tuple[str, ...] = tuple(name for name in METRIC_NAMES if name != "loss/kl")
"""The metrics the fused forward writes, in kernel order (no KL: the fused path has none)."""

BLOCK = 1024
"""Elements per tile of a reduction program (4 warps, 8 fp32 per thread)."""
PROGRAMS_PER_SM = 4
MAX_BATCH = 4096
"""Largest batch the single finalize program handles; larger batches run eagerly."""


@dataclass(frozen=True)
class SurrogateConfig:
    """Scalars of the normalizer, reweighter and surrogate, baked into the kernels."""

    debias: bool
    scale_mode: int
    """Log-ratio scale: 0 none, 1 the std s_t (RatioNorm), 2 the ``scale`` tensor."""
    weight_mode: int
    """Timestep weight: 0 uniform, 1 ``1 / |dt|``, 2 the ``weight`` tensor."""
    adv_clip: float | None
    lo_bound: float | None
    """1 - low (None: no lower clip)."""
    hi_bound: float | None
    """1 + high (None: no upper clip)."""
    dual: float | None
    finalize_in_reduction: bool = True
    """One forward launch (the last reduction program finalizes) or two launches."""


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count (a read-only cache of a hardware property)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs_target(device: torch.device) -> int:
    """Programs per launch: a few per multiprocessor (8 in the CPU interpreter)."""
    if device.type != "cuda":
        return 8  # the interpreter runs programs one by one: few, long ones
    return PROGRAMS_PER_SM * _multiprocessors(device)


def _chunking(batch: int, dim: int, device: torch.device) -> tuple[int, int]:
    """(CHUNK, C): elements per program (a multiple of BLOCK) and programs per row."""
    per_program = -(-batch * dim // _programs_target(device))
    chunk = BLOCK * max(1, -(-per_program // BLOCK))
    return chunk, -(-dim // chunk)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _forward(
    mean: Tensor, other: Tensor, next_sample: Tensor, std: Tensor, dt: Tensor,
    advantages: Tensor, scale: Tensor | None, weight: Tensor | None, cfg: SurrogateConfig,
    noise: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Launch the forward. Returns ``(loss, log_ratio, ratio, clipped, rows, stats)`` with
    ``rows`` (5, B): dL/dr, cc, cq, clipped advantages, weights."""
    from ._kernels import STAT_COUNT, guard_finalize_kernel, guard_forward_kernel

    batch = mean.shape[0]
    dim = mean.numel() // batch
    chunk, chunks = _chunking(batch, dim, mean.device)
    device = mean.device
    loss = torch.empty((), dtype=torch.float32, device=device)
    log_ratio = torch.empty(batch, dtype=torch.float32, device=device)
    ratio = torch.empty(batch, dtype=torch.float32, device=device)
    clipped = torch.empty(batch, dtype=torch.bool, device=device)
    partials = 2 * batch * chunks
    aux = torch.empty(partials + 5 * batch + STAT_COUNT, dtype=torch.float32, device=device)
    work, rows = aux[:partials], aux[partials:]
    block_b = _next_pow2(batch)
    block_c = min(_next_pow2(chunks), max(1, 2048 // block_b))
    inputs = (
        std,
        dt,
        std if scale is None else scale,
        std if weight is None else weight,
        advantages,
    )
    outputs = (loss, log_ratio, ratio, clipped, rows)
    scalars = (
        1.0 / dim, 1.0 / batch,
        cfg.adv_clip or 0.0, cfg.lo_bound or 0.0, cfg.hi_bound or 0.0, cfg.dual or 0.0,
    )  # fmt: skip
    flags = dict(
        DEBIAS=cfg.debias,
        SCALE_MODE=cfg.scale_mode,
        WEIGHT_MODE=cfg.weight_mode,
        HAS_ADV_CLIP=cfg.adv_clip is not None,
        HAS_LOW=cfg.lo_bound is not None,
        HAS_HIGH=cfg.hi_bound is not None,
        HAS_DUAL=cfg.dual is not None,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
    )
    # the finalize counter belongs to this call: concurrent calls (other losses, other
    # streams) never share one
    counter = torch.zeros(1, dtype=torch.float32, device=device)
    guard_forward_kernel[(chunks, batch)](
        mean, other, next_sample, *inputs, counter, work, *outputs,
        batch, chunks, dim, chunk, *scalars,
        NOISE=noise, FINALIZE=cfg.finalize_in_reduction, BLOCK=BLOCK, **flags,
        num_warps=4,
    )  # fmt: skip
    if not cfg.finalize_in_reduction:
        guard_finalize_kernel[(1,)](
            work, *inputs, *outputs, batch, chunks, *scalars, **flags, num_warps=4
        )
    return loss, log_ratio, ratio, clipped, rows[: 5 * batch].view(5, batch), rows[5 * batch :]


def _backward(
    mean: Tensor, other: Tensor, next_sample: Tensor, std: Tensor, coef: Tensor,
    slope: Tensor, grad_loss: Tensor | None, grad_log_ratio: Tensor | None,
    grad_ratio: Tensor | None, noise: bool,
) -> Tensor:  # fmt: skip
    from ._kernels import guard_backward_kernel

    batch = mean.shape[0]
    dim = mean.numel() // batch
    chunk, chunks = _chunking(batch, dim, mean.device)
    grad = torch.empty_like(mean)
    guard_backward_kernel[(chunks, batch)](
        grad, mean, other, next_sample, std, coef, slope,
        coef if grad_loss is None else grad_loss,
        coef if grad_log_ratio is None else grad_log_ratio.contiguous(),
        coef if grad_ratio is None else grad_ratio.contiguous(),
        batch, dim, chunk,
        NOISE=noise,
        HAS_GRAD_LOSS=grad_loss is not None,
        HAS_GRAD_LOG_RATIO=grad_log_ratio is not None,
        HAS_GRAD_RATIO=grad_ratio is not None,
        BLOCK=BLOCK,
        num_warps=4,
    )  # fmt: skip
    return grad


class _FusedGuard(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, mean: Tensor, other: Tensor, next_sample: Tensor, std: Tensor, dt: Tensor,
        advantages: Tensor, scale: Tensor | None, weight: Tensor | None,
        cfg: SurrogateConfig, noise: bool,
    ) -> tuple[Tensor, ...]:  # fmt: skip
        loss, log_ratio, ratio, clipped, rows, stats = _forward(
            mean, other, next_sample, std, dt, advantages, scale, weight, cfg, noise
        )
        ctx.save_for_backward(mean, other, next_sample, std, rows, log_ratio, ratio)
        ctx.noise = noise
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(clipped, rows, stats)
        return loss, log_ratio, ratio, clipped, rows, stats

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor | None, grad_log_ratio: Tensor | None,
        grad_ratio: Tensor | None, *_: Any,
    ) -> tuple[Tensor | None, ...]:  # fmt: skip
        mean, other, next_sample, std, rows, log_ratio, ratio = ctx.saved_tensors
        nothing = grad_loss is None and grad_log_ratio is None and grad_ratio is None
        if nothing or not ctx.needs_input_grad[0]:
            return (None,) * 10
        # d ratio / d r of regclip.surrogate.bounded_exp: the ratio itself up to the bound
        slope = ratio
        if grad_ratio is not None:
            slope = torch.where(log_ratio > MAX_LOG_RATIO, math.exp(MAX_LOG_RATIO), ratio)
        grad = _backward(
            mean, other, next_sample, std, rows, slope,
            grad_loss, grad_log_ratio, grad_ratio, ctx.noise,
        )  # fmt: skip
        return (grad,) + (None,) * 9


def fused_guard(
    mean: Tensor, other: Tensor, next_sample: Tensor, std: Tensor, dt: Tensor,
    advantages: Tensor, cfg: SurrogateConfig, *, noise: bool,
    scale: Tensor | None = None, weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Fused closed-form guard loss.

    ``std``, ``dt``, ``advantages`` (B,) float32; ``scale``/``weight`` (B,) float32 when
    ``cfg.scale_mode``/``cfg.weight_mode`` is 2. Returns ``(loss, log_ratio, ratio,
    clipped, rows, stats)``: a 0-d loss, (B,) float32 log-ratio and ratio (differentiable
    with respect to ``mean``), (B,) bool clip mask, (5, B) rows (dL/dr, cc, cq, clipped
    advantages, weights) and the (len(STAT_NAMES),) metric vector. ``other`` is the old
    mean, or the rollout noise when ``noise`` is true.
    """
    if (cfg.scale_mode == 2) != (scale is not None) or (cfg.weight_mode == 2) != (
        weight is not None
    ):
        raise ValueError("pass `scale`/`weight` exactly when the config's mode is 2 (a tensor)")
    out = _FusedGuard.apply(
        mean.contiguous(), other.contiguous(), next_sample.contiguous(), std, dt, advantages,
        scale, weight, cfg, noise,
    )  # fmt: skip
    return tuple(out)
