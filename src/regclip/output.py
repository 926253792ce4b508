"""``LossOutput``: what one :class:`regclip.GuardedPPOLoss` call returns, whichever backend
(eager or fused) computed it. Shapes: per-sample values ``(B,)``, the loss 0-d."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["LossOutput"]


@dataclass(frozen=True)
class LossOutput:
    """Result of one :class:`GuardedPPOLoss` call."""

    loss: Tensor
    """0-d tensor to ``backward()``."""
    log_ratio: Tensor
    """(B,) the normalized log-ratio (with grad)."""
    ratio: Tensor
    """(B,) exp(log_ratio), continued linearly past ``log_ratio = 20`` so it never
    overflows (:func:`regclip.surrogate.bounded_exp`)."""
    clipped: Tensor
    """(B,) bool: the sample's gradient was zeroed by clipping."""
    weight: Tensor
    """(B,) timestep weights."""
    advantages: Tensor
    """(B,) advantages after clipping."""
    clip_bounds: tuple[float | Tensor | None, float | Tensor | None]
    """(low, high) clip ranges of the surrogate."""
    compute_metric_tensors: Callable[[], dict[str, Tensor]] = field(repr=False)
    """Computes the metrics on demand, so a loop that never reads them pays nothing."""
    backend: str = "eager"
    """Which path computed this output: ``"eager"`` (PyTorch) or ``"fused"`` (Triton)."""

    @cached_property
    def metric_tensors(self) -> dict[str, Tensor]:
        """The metrics as 0-d tensors (no device synchronisation), computed on first access."""
        return self.compute_metric_tensors()

    @cached_property
    def metrics(self) -> dict[str, float]:
        """Flat dict of floats with the stable names of :mod:`regclip.diagnostics`.

        Computed on first access with a single device synchronisation.
        """
        names = list(self.metric_tensors)
        values = torch.stack([self.metric_tensors[n].float() for n in names]).tolist()
        return dict(zip(names, values, strict=True))
