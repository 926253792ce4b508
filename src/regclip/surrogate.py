r"""Clipped surrogates: per-sample policy loss from a (normalized) log-ratio and advantages.

With ``rho = exp(r)`` and advantage ``A``, the PPO family minimises

.. math:: \ell = \max\big(-A\rho,\; -A\,\mathrm{clip}(\rho, 1-\epsilon_{lo}, 1+\epsilon_{hi})\big),

whose gradient is zero exactly where clipping binds: ``A > 0`` and ``rho > 1 + eps_hi``, or
``A < 0`` and ``rho < 1 - eps_lo``. Dual clip (Ye et al., 2020) also caps the loss of a
negative-advantage sample at ``-c A``, zeroing its gradient once ``rho > c``.

**Huge log-ratios.** ``exp(r)`` overflows float32 at ``r ~ 88.7``, and an overflowed ratio
turns the zero gradient of a clipped sample into ``0 * inf = NaN``. Every surrogate here
therefore forms the ratio with :func:`bounded_exp`: ``exp(r)`` (bit for bit, value and
gradient) up to ``r = MAX_LOG_RATIO = 20`` (a ratio of 4.9e8, far past any trust region),
and the tangent line ``exp(20) (1 + r - 20)`` above. Consequences, for any finite ``r``
(the inputs are checked finite):

* clipping decisions are those of ``exp(r)`` (clip bounds and the dual cap are required to
  lie below ``exp(MAX_LOG_RATIO)``, where both agree);
* a clipped (or masked) sample has loss ``-A (1 +/- eps)`` and gradient exactly 0;
* an *unclipped* sample past the bound (``A < 0`` with ``r > 20`` under PPO clip without
  a dual cap, or any sample under :func:`NoClip`) keeps a finite loss
  ``-A exp(20) (1 + r - 20)`` and the finite gradient ``-A exp(20)``: it is still pushed
  back, with the gradient the ratio had at the bound, instead of an overflow to inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "MAX_LOG_RATIO",
    "AsymmetricClip",
    "ClippedSurrogate",
    "DualClip",
    "NoClip",
    "PPOClip",
    "SurrogateOutput",
    "bounded_exp",
]

MAX_LOG_RATIO = 20.0
"""Above this log-ratio the ratio continues linearly (:func:`bounded_exp`)."""

_MAX_BOUND = math.exp(MAX_LOG_RATIO)
"""Clip bounds and the dual cap must lie below the ratio at the bound, where
:func:`bounded_exp` and ``exp`` make the same decisions."""


def bounded_exp(log_ratio: Tensor) -> Tensor:
    r"""(B,) ``exp(r)`` for ``r <= MAX_LOG_RATIO`` and ``exp(R) (1 + r - R)`` above (R the bound).

    Equal to ``torch.exp`` bit for bit, value and gradient, up to the bound; above it,
    finite, increasing, with gradient ``exp(R)``. The ratio of every surrogate.
    """
    capped = log_ratio.clamp(max=MAX_LOG_RATIO)
    return torch.exp(capped) * (1 + (log_ratio - capped))


@dataclass(frozen=True)
class SurrogateOutput:
    loss: Tensor
    """(B,) per-sample surrogate loss."""
    ratio: Tensor
    """(B,) exp(r) (:func:`bounded_exp`: linear above ``r = MAX_LOG_RATIO``)."""
    clipped: Tensor
    """(B,) bool: clipping (or dual clipping) zeroed this sample's gradient."""
    dual_clipped: Tensor
    """(B,) bool: the dual clip bound (subset of ``clipped``)."""
    bounds: tuple[Tensor | None, Tensor | None] | None = None
    """Per-sample (B,) clip ranges ``(low, high)`` when they vary across the batch (e.g.
    :class:`regclip.AdaptiveClip`); ``None``: the surrogate's scalar ``low``/``high``."""


class ClippedSurrogate(nn.Module):
    """``max(-A rho, -A clip(rho, 1 - low, 1 + high))``, optionally dual-clipped.

    ``low``/``high`` of ``None`` disable that side; ``dual`` (> 1) caps negative-advantage
    losses at ``-dual * A``.

    Subclasses that need more than the log-ratio (the step ``t``, the means) set
    ``needs_batch = True``; :class:`regclip.GuardedPPOLoss` then calls
    ``forward(log_ratio, advantages, batch=batch)`` with the validated
    :class:`regclip.TransitionBatch`.
    """

    needs_batch: bool = False

    def __init__(self, low: float | None, high: float | None, dual: float | None = None) -> None:
        super().__init__()
        for name, value in (("low", low), ("high", high)):
            if value is not None and not 0 < value < _MAX_BOUND - 1:
                raise ValueError(
                    f"clip range `{name}` must be finite and > 0 (below {_MAX_BOUND - 1:.3g}), "
                    f"got {value}"
                )
        if low is not None and low >= 1:
            raise ValueError(f"clip range `low` must be < 1 (ratio stays positive), got {low}")
        if dual is not None and not 1 < dual < _MAX_BOUND:
            raise ValueError(f"`dual` must be finite and > 1 (below {_MAX_BOUND:.3g}), got {dual}")
        self.low = low
        self.high = high
        self.dual = dual

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}, dual={self.dual}"

    def forward(self, log_ratio: Tensor, advantages: Tensor) -> SurrogateOutput:
        ratio = bounded_exp(log_ratio)
        unclipped = -advantages * ratio
        lower = None if self.low is None else 1.0 - self.low
        upper = None if self.high is None else 1.0 + self.high
        if lower is None and upper is None:
            loss = unclipped
        else:
            loss = torch.maximum(unclipped, -advantages * torch.clamp(ratio, lower, upper))
        with torch.no_grad():
            clipped = torch.zeros_like(ratio, dtype=torch.bool)
            if upper is not None:
                clipped |= (advantages > 0) & (ratio > upper)
            if lower is not None:
                clipped |= (advantages < 0) & (ratio < lower)
            dual_clipped = torch.zeros_like(clipped)
        if self.dual is not None:
            cap = -self.dual * advantages
            loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
            with torch.no_grad():
                dual_clipped = (advantages < 0) & (ratio > self.dual)
                clipped = clipped | dual_clipped
        return SurrogateOutput(loss, ratio, clipped, dual_clipped)


def PPOClip(clip_range: float) -> ClippedSurrogate:
    """Symmetric PPO clip ``[1 - eps, 1 + eps]`` (Flow-GRPO, DanceGRPO, GRPO-Guard)."""
    return ClippedSurrogate(clip_range, clip_range)


def AsymmetricClip(low: float, high: float) -> ClippedSurrogate:
    """Clip-higher (DAPO-style): ``[1 - low, 1 + high]`` with its own upper range."""
    return ClippedSurrogate(low, high)


def DualClip(clip_range: float, dual: float = 3.0) -> ClippedSurrogate:
    """PPO clip plus the dual bound ``-dual * A`` on negative-advantage losses."""
    return ClippedSurrogate(clip_range, clip_range, dual=dual)


def NoClip() -> ClippedSurrogate:
    """Plain importance-weighted policy gradient ``-A rho`` (no clipping); past
    ``r = MAX_LOG_RATIO`` the ratio continues linearly (module docstring)."""
    return ClippedSurrogate(None, None)
