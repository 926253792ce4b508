"""``KLPenalty``: the KL between the current and the reference policy's transition
Gaussians, an optional term of :class:`regclip.GuardedPPOLoss`. Shapes: means ``(B, ...)``,
the result ``(B,)``."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ._validate import check_positive
from .batch import TransitionBatch

__all__ = ["KLPenalty"]


class KLPenalty(nn.Module):
    r"""``coef * mean_D((mu_theta - mu_ref)^2) / (2 var)``, the KL between the current and
    reference transition Gaussians (same std), averaged over latent dims.

    ``variance="transition"`` uses the true transition variance ``s_t^2``;
    ``variance="sigma"`` uses ``sigma_t^2 = s_t^2 / |dt|``, which is what Flow-GRPO's
    ``train_sd3.py`` divides by (its ``std_dev_t`` is sigma_t), so a ``beta`` tuned there
    means the same here.
    """

    def __init__(
        self, coef: float, variance: Literal["transition", "sigma"] = "transition"
    ) -> None:
        super().__init__()
        check_positive(coef, "KL `coef`", strict=False)
        if variance not in ("transition", "sigma"):
            raise ValueError(f"`variance` must be 'transition' or 'sigma', got {variance!r}")
        self.coef = coef
        self.variance = variance

    def extra_repr(self) -> str:
        return f"coef={self.coef}, variance={self.variance!r}"

    def forward(self, batch: TransitionBatch) -> Tensor:
        """(B,) per-sample KL (before ``coef``)."""
        if batch.mean is None or batch.ref_mean is None:
            raise ValueError("the KL penalty needs `mean` and `ref_mean`")
        dtype = batch.compute_dtype()
        delta = batch.mean.to(dtype) - batch.ref_mean.detach().to(dtype)
        var = batch.std.to(dtype) ** 2
        if self.variance == "sigma":
            var = var / batch.dt.to(dtype).abs()
        return (delta**2).mean(dim=tuple(range(1, delta.ndim))) / (2 * var)
