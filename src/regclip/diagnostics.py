"""Diagnostics: whether clipping is doing its job, per call and per timestep.

Stable metric names (all floats, in ``LossOutput.metrics``):

==========================  ===============================================================
``loss``                    total loss (policy + KL)
``loss/policy``             weighted mean surrogate
``loss/kl``                 mean KL term (before its coefficient); only with a KL penalty
``ratio/mean|std|min|max``  the importance ratio exp(r) used by the surrogate
``log_ratio/mean|std``      the (normalized) log-ratio r
``log_ratio/shift_z``       ``-mean(r) / std(r)``: the left shift in units of its spread.
                            Vanilla drifts positive after the first optimizer step on a
                            rollout; RatioNorm keeps it near 0. The over-optimization signal.
``clip/frac``               fraction of samples whose gradient clipping zeroed
``clip/pos_high``           of A > 0 samples: ratio above 1 + high (clipped)
``clip/pos_low``            of A > 0 samples: ratio below 1 - low (out of range, unclipped)
``clip/neg_low``            of A < 0 samples: ratio below 1 - low (clipped)
``clip/neg_high``           of A < 0 samples: ratio above 1 + high (out of range; clipped
                            only by a dual clip)
``clip/dual_frac``          fraction stopped by the dual-clip bound
``adv/mean|abs_mean``       advantages after clipping
``adv/clip_frac``           fraction of advantages changed by advantage clipping
``weight/mean``             mean timestep weight
==========================  ===============================================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from ._validate import check_finite
from .output import LossOutput
from .surrogate import MAX_LOG_RATIO

__all__ = ["METRIC_NAMES", "TimestepDiagnostics", "calibrate_clip_range", "metric_tensors"]

METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "loss/policy",
    "loss/kl",
    "ratio/mean",
    "ratio/std",
    "ratio/min",
    "ratio/max",
    "log_ratio/mean",
    "log_ratio/std",
    "log_ratio/shift_z",
    "clip/frac",
    "clip/pos_high",
    "clip/pos_low",
    "clip/neg_low",
    "clip/neg_high",
    "clip/dual_frac",
    "adv/mean",
    "adv/abs_mean",
    "adv/clip_frac",
    "weight/mean",
)


def _fraction(mask: Tensor, within: Tensor) -> Tensor:
    """Share of ``within`` samples where ``mask`` holds (0 when ``within`` is empty)."""
    count = within.sum()
    return (mask & within).sum() / count.clamp(min=1)


@torch.no_grad()
def metric_tensors(
    *,
    loss: Tensor,
    policy_loss: Tensor,
    kl: Tensor | None,
    log_ratio: Tensor,
    ratio: Tensor,
    clipped: Tensor,
    dual_clipped: Tensor,
    advantages: Tensor,
    raw_advantages: Tensor,
    weight: Tensor,
    low: float | Tensor | None,
    high: float | Tensor | None,
) -> dict[str, Tensor]:
    """All per-call metrics as 0-d tensors (no device synchronisation)."""
    r = log_ratio.detach().float()
    rho = ratio.detach().float()
    pos, neg = advantages > 0, advantages < 0
    above = rho > 1 + high if high is not None else torch.zeros_like(pos)
    below = rho < 1 - low if low is not None else torch.zeros_like(pos)
    r_std = r.std(unbiased=False)
    out = {
        "loss": loss.detach(),
        "loss/policy": policy_loss.detach(),
        "ratio/mean": rho.mean(),
        "ratio/std": rho.std(unbiased=False),
        "ratio/min": rho.min(),
        "ratio/max": rho.max(),
        "log_ratio/mean": r.mean(),
        "log_ratio/std": r_std,
        "log_ratio/shift_z": torch.where(r_std > 0, -r.mean() / r_std, torch.zeros_like(r_std)),
        "clip/frac": clipped.float().mean(),
        "clip/pos_high": _fraction(above, pos),
        "clip/pos_low": _fraction(below, pos),
        "clip/neg_low": _fraction(below, neg),
        "clip/neg_high": _fraction(above, neg),
        "clip/dual_frac": dual_clipped.float().mean(),
        "adv/mean": advantages.float().mean(),
        "adv/abs_mean": advantages.float().abs().mean(),
        "adv/clip_frac": (advantages != raw_advantages).float().mean(),
        "weight/mean": weight.detach().float().mean(),
    }
    if kl is not None:
        out["loss/kl"] = kl.detach()
    return out


def calibrate_clip_range(log_ratio: Tensor, target_fraction: float) -> float:
    """Symmetric clip range eps so that ``target_fraction`` of the given log-ratios fall
    outside ``[1 - eps, 1 + eps]``.

    Feed it normalized log-ratios measured on the second or later optimizer step of a
    rollout (on the first the ratio is exactly 1). The result is the
    ``1 - target_fraction`` quantile of ``|exp(r) - 1|``, with ``r`` capped at
    :data:`regclip.surrogate.MAX_LOG_RATIO` as the surrogates' ratio is (no overflow; a
    quantile that high is no usable clip range anyway). A NaN or infinite log-ratio is
    refused (``ValueError``), not skipped: it means the measurement itself went wrong.
    """
    if not 0 < target_fraction < 1:
        raise ValueError(f"`target_fraction` must lie in (0, 1), got {target_fraction}")
    if log_ratio.numel() == 0:
        raise ValueError("`log_ratio` is empty")
    check_finite(log_ratio, "log_ratio")
    capped = log_ratio.detach().double().flatten().clamp(max=MAX_LOG_RATIO)
    deviation = torch.expm1(capped).abs()
    eps = float(torch.quantile(deviation, 1 - target_fraction))
    if eps <= 0:
        raise ValueError("all log-ratios are 0: measure them after the first optimizer step")
    return eps


class TimestepDiagnostics:
    """Accumulates ratio and clip statistics per timestep index across loss calls.

    Call :meth:`update` after each loss call with the step index of its transitions and
    the :class:`regclip.LossOutput`; :meth:`summary` gives per-step means and stds, the
    paper's diagnostic figure (ratio mean and spread per timestep).
    """

    # ratio statistics accumulate (ratio - 1) in float64: ratios within 1e-5 of 1 would
    # lose their variance to cancellation in sum(ratio^2) - n mean^2 otherwise.
    _FIELDS = (
        "n",
        "ratio_dev",
        "ratio_dev_sq",
        "log_ratio",
        "log_ratio_sq",
        "n_pos",
        "n_neg",
        "pos_high",
        "pos_low",
        "neg_low",
        "neg_high",
        "clipped",
    )

    def __init__(self) -> None:
        self._sums: dict[int, dict[str, float]] = defaultdict(
            lambda: dict.fromkeys(self._FIELDS, 0.0)
        )

    def reset(self) -> None:
        self._sums.clear()

    def update(self, step: int | Sequence[int] | Tensor, output: LossOutput) -> None:
        """Add a loss call's per-sample values, grouped by ``step`` (an int or (B,))."""
        log_ratio = output.log_ratio.detach().double().cpu()
        ratio = output.ratio.detach().double().cpu()
        adv = output.advantages.detach().cpu()
        clipped = output.clipped.detach().cpu()
        low, high = (  # per-sample (B,) ranges (AdaptiveClip) come to the host too
            b.detach().double().cpu() if isinstance(b, Tensor) else b for b in output.clip_bounds
        )
        steps = torch.as_tensor(step).reshape(-1).expand(log_ratio.shape[0]).cpu()
        above = ratio > 1 + high if high is not None else torch.zeros_like(clipped)
        below = ratio < 1 - low if low is not None else torch.zeros_like(clipped)
        pos, neg = adv > 0, adv < 0
        for value in steps.unique().tolist():
            sel = steps == value
            acc = self._sums[int(value)]
            acc["n"] += float(sel.sum())
            acc["ratio_dev"] += float((ratio[sel] - 1).sum())
            acc["ratio_dev_sq"] += float(((ratio[sel] - 1) ** 2).sum())
            acc["log_ratio"] += float(log_ratio[sel].sum())
            acc["log_ratio_sq"] += float((log_ratio[sel] ** 2).sum())
            acc["n_pos"] += float((pos & sel).sum())
            acc["n_neg"] += float((neg & sel).sum())
            acc["pos_high"] += float((pos & above & sel).sum())
            acc["pos_low"] += float((pos & below & sel).sum())
            acc["neg_low"] += float((neg & below & sel).sum())
            acc["neg_high"] += float((neg & above & sel).sum())
            acc["clipped"] += float((clipped & sel).sum())

    def summary(self) -> dict[int, dict[str, float]]:
        """Per step: ratio mean/std, log-ratio mean/std, clip fractions by sign and side."""
        result = {}
        for step in sorted(self._sums):
            acc = self._sums[step]
            n = max(acc["n"], 1.0)
            dev_mean, lr_mean = acc["ratio_dev"] / n, acc["log_ratio"] / n
            result[step] = {
                "count": acc["n"],
                "ratio/mean": 1.0 + dev_mean,
                "ratio/std": max(acc["ratio_dev_sq"] / n - dev_mean**2, 0.0) ** 0.5,
                "log_ratio/mean": lr_mean,
                "log_ratio/std": max(acc["log_ratio_sq"] / n - lr_mean**2, 0.0) ** 0.5,
                "clip/frac": acc["clipped"] / n,
                "clip/pos_high": acc["pos_high"] / max(acc["n_pos"], 1.0),
                "clip/pos_low": acc["pos_low"] / max(acc["n_pos"], 1.0),
                "clip/neg_low": acc["neg_low"] / max(acc["n_neg"], 1.0),
                "clip/neg_high": acc["neg_high"] / max(acc["n_neg"], 1.0),
            }
        return result
