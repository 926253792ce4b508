r"""Timestep reweighters: a per-sample weight w_t multiplying each transition's surrogate.

The property that matters (GRPO-Guard section 3.3): the gradient that one timestep sends
to the model's *velocity output* should not depend on t, or a few noise levels dominate
the update. For a normalized log-ratio r, ``d r / d v = k_t eps / D`` at the rollout point
(``k_t`` is :meth:`regclip.ratio.RatioNormalizer.velocity_gain`), so ``w_t = 1 / |k_t|``
makes the per-timestep velocity gradient independent of t. :class:`EqualizingWeight` does
exactly that for whichever normalizer the loss uses.

Which published variant each option reproduces:

* :class:`UniformWeight` -- vanilla Flow-GRPO / DanceGRPO (no reweighting).
* :class:`InverseDtWeight` -- the public GRPO-Guard code for Flow-SDE (surrogate divided
  by ``-dt``). For Flow-SDE with RatioNorm ``k_t = (1 + eta^2 / 2) dt`` below t = 1, so
  this is equalizing up to a constant; at the t = 1 step it is not exact.
* :class:`BatchInverseDtWeight` -- the GRPO-Guard authors' script: the batch's loss
  divided by ``mean_B(sqrt(-dt))^2``, one weight for the whole batch.
* :class:`DanceBetaWeight` -- one public reading for DanceGRPO, ``beta_t / |dt|`` with
  ``beta_t = 1 + eta^2 (1 - t) / (2t)``. With RatioNorm ``k_t = beta_t dt``, so it leaves
  a ``beta_t^2`` dependence; the equalizing weight is ``1 / (beta_t |dt|)``.
* :class:`EqualizingWeight` -- ``1 / |k_t|`` for any kernel and normalizer (for the
  velocity-space normalizer ``|k_t| = 1`` and it reduces to uniform).
* :class:`CustomWeight` -- any user function of ``(t, dt)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._validate import check_positive, require
from .batch import TransitionBatch
from .ratio import RatioNormalizer

__all__ = [
    "BatchInverseDtWeight",
    "CustomWeight",
    "DanceBetaWeight",
    "EqualizingWeight",
    "InverseDtWeight",
    "TimestepReweighter",
    "UniformWeight",
]


class TimestepReweighter(nn.Module):
    """Base class: ``forward(batch, normalizer) -> (B,)`` non-negative weights."""

    name = "base"

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        raise NotImplementedError


class UniformWeight(TimestepReweighter):
    """``w_t = 1``."""

    name = "uniform"

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        return torch.ones_like(batch.std)


class InverseDtWeight(TimestepReweighter):
    """``w_t = 1 / |dt|`` (public GRPO-Guard for Flow-SDE)."""

    name = "inverse_dt"

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        return 1.0 / batch.dt.abs()


class BatchInverseDtWeight(TimestepReweighter):
    """``w = 1 / mean_B(sqrt(|dt|))^2`` for every sample (``train_sd3_GRPO_Guard.py``).

    Equal to :class:`InverseDtWeight` when the batch shares one step, as the authors'
    micro-batches do.
    """

    name = "batch_inverse_dt"

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        scale = torch.sqrt(batch.dt.abs()).mean()
        return (1.0 / scale**2).expand(batch.std.shape)


class DanceBetaWeight(TimestepReweighter):
    """``w_t = beta_t / |dt|``, ``beta_t = 1 + eta^2 (1 - t) / (2t)`` (a public DanceGRPO reading)."""

    name = "dance_beta"

    def __init__(self, eta: float) -> None:
        super().__init__()
        check_positive(eta, "`eta`")
        self.eta = eta

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        t = require(batch.t, "t", "DanceBetaWeight")
        beta = 1 + self.eta**2 * (1 - t) / (2 * t)
        return beta / batch.dt.abs()


class EqualizingWeight(TimestepReweighter):
    """``w_t = 1 / |k_t|``: per-timestep velocity gradients independent of t (module doc).

    Needs the kernel's velocity slope, so the loss needs a ``kernel`` and the call a ``t``.
    """

    name = "equalizing"

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        return 1.0 / normalizer.velocity_gain(batch).abs()


class CustomWeight(TimestepReweighter):
    """User weights ``fn(t, dt) -> (B,)``; ``t`` is ``None`` when the call gave none."""

    name = "custom"

    def __init__(self, fn: Callable[[Tensor | None, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, batch: TransitionBatch, normalizer: RatioNormalizer) -> Tensor:
        weight = torch.as_tensor(
            self.fn(batch.t, batch.dt), dtype=batch.std.dtype, device=batch.std.device
        )
        if weight.shape != batch.std.shape:
            raise ValueError(
                f"the custom weight function returned shape {tuple(weight.shape)}, "
                f"expected {tuple(batch.std.shape)}"
            )
        return weight
