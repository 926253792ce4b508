r"""Adaptive clipping: one PPO clip range per sampling step, tuned online to a target.

:class:`AdaptiveClip` is a drop-in ``surrogate`` of :class:`regclip.GuardedPPOLoss`, so it
composes with every ratio normalizer and reweighter. For a sample at schedule step ``k``
(the schedule entry nearest to its ``t``) it is the symmetric PPO clip with that step's
range ``eps_k``:

.. math:: \ell_i = \max\big(-A_i\rho_i,\; -A_i\,\mathrm{clip}(\rho_i, 1-\epsilon_{k_i}, 1+\epsilon_{k_i})\big).

**Controller.** While training, each forward adds per step ``k`` (on the device, no host
synchronisation) the number ``n_k`` of samples whose log-ratio is not exactly 0 and the
number ``h_k`` of them outside the range, ``|rho - 1| > eps_k``. :meth:`AdaptiveClip.step`
(once per optimizer step; every rank must call it) sums both over ranks when
``torch.distributed`` is initialized, then updates in log space

.. math:: \epsilon_k \leftarrow \mathrm{clamp}\Big(\epsilon_k
          \exp\big(g\,(h_k / n_k - f^*)\big),\ \epsilon_{\min},\ \epsilon_{\max}\Big)

(steps with ``n_k = 0`` keep their range) and resets the counts. Because every rank applies
the same update to the same reduced counts, all ranks keep identical ranges.

**Why a target out-of-range fraction, not a target trust radius.** The out-of-range
fraction ``F_k(eps) = P(|rho - 1| > eps)`` at step ``k`` is decreasing in ``eps``, so the
controller's fixed point is ``eps_k = F_k^{-1}(f*)``: the ``1 - f*`` quantile of
``|rho - 1|`` at that step. Every normalizer in :mod:`regclip.ratio` differs from another
by a per-step factor, ``r' = a_k r``; for small ratios ``|rho - 1| ~ |r|``, so the quantile
scales by ``a_k`` and the fraction at the fixed point is the same ``f*``. A fraction is
therefore scale-free: one target means the same thing for the vanilla, mean-revised,
RatioNorm and velocity-space ratios, at every step, for every kernel and latent size. A
target trust radius (a fixed ``eps`` in some unit) is exactly the per-normalizer, per-step
constant a user cannot guess; the trust region on the exact divergence is offered
separately as :class:`regclip.KLMask`. Under the rollout policy RatioNorm's ``r`` is
Gaussian with spread ``sigma_k = sqrt(sum_D Delta^2) / D``, so the fixed point is
``eps_k ~ z_{1 - f*/2} sigma_k`` (1.44 ``sigma_k`` for ``f* = 0.15``): the range follows the
size of the step's update, the per-step engagement becomes flat by construction, and
about ``f*/2`` of the samples (those moved along their advantage) have their gradient
zeroed. Counting ``|rho - 1| > eps`` rather than zeroed gradients makes the statistic a
property of the ratio distribution alone, independent of how advantages and ratios
correlate; ``statistic="clipped"`` targets the zeroed-gradient fraction instead.

Samples with a log-ratio of exactly 0 (the first optimizer step on a rollout, where
``mu_theta = mu_old``) carry no information about the scale and are not counted. Near the
fixed point, with ``F`` the fraction as a function of ``log eps``, the update contracts the
error by ``1 - g |dF/dlog eps|``; for a Gaussian ratio ``|dF/dlog eps| = 2 z phi(z) = 0.41``
at ``f* = 0.15``, so the default gain 1 converges geometrically (factor 0.59 per step) and
any gain below ~4.9 is stable. Far from it, one step moves ``eps`` by at most
``exp(g (1 - f*))`` up and ``exp(-g f*)`` down.

**Initial range.** ``init`` (default 1e-4, Flow-GRPO's range for the raw log-ratio); use
the normalizer's usual range (:func:`regclip.presets.adaptive_guard` starts RatioNorm at
2e-6). No calibration from the first batch is done: the first update after any move of
the policy already corrects ``eps`` multiplicatively.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ._validate import check_positive
from .batch import TransitionBatch
from .surrogate import ClippedSurrogate, SurrogateOutput, bounded_exp

__all__ = ["AdaptiveClip"]

Statistic = Literal["out_of_range", "clipped"]


class AdaptiveClip(ClippedSurrogate):
    """Symmetric PPO clip with one range per sampling step, adjusted toward a target
    fraction of out-of-range ratios (module docstring for the controller and its target).

    Args:
        times: (T,) the sampling schedule's step times (scheduler sigmas of each step's
            start); a sample uses the range of the entry nearest to its ``t``.
        target: target fraction ``f*`` in (0, 1) of counted samples with
            ``|rho - 1| > eps_k`` (or with a zeroed gradient, ``statistic="clipped"``).
        init: initial range of every step.
        gain: controller gain ``g`` > 0 (log-range change per unit fraction error).
        min_range, max_range: clamp of every range, ``0 < min_range <= max_range < 1``.
        statistic: ``"out_of_range"`` (``|rho - 1| > eps``) or ``"clipped"`` (gradient zeroed).
        process_group: the group whose counts :meth:`step` sums (default: the world).

    State (all buffers, in ``state_dict``): ``times`` (T,), ``ranges`` (T,) float64,
    ``counts``/``hits`` (T,) the accumulators since the last :meth:`step`,
    ``observed`` (T,) the fraction seen at the last :meth:`step` (NaN where nothing was
    counted), ``frozen`` (bool) and ``num_steps`` (int). The loss call needs ``t``.
    In ``eval()`` mode nothing is accumulated. The buffers move to the inputs' device on
    the first call (or with ``.to()``); under NCCL call :meth:`step` after a forward.
    """

    needs_batch = True
    times: Tensor
    ranges: Tensor
    counts: Tensor
    hits: Tensor
    observed: Tensor
    frozen: Tensor
    num_steps: Tensor

    def __init__(
        self,
        times: Tensor | Sequence[float],
        *,
        target: float = 0.15,
        init: float = 1e-4,
        gain: float = 1.0,
        min_range: float = 1e-9,
        max_range: float = 0.5,
        statistic: Statistic = "out_of_range",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(None, None)
        schedule = torch.as_tensor(times, dtype=torch.float64).detach().flatten().clone()
        if schedule.numel() == 0 or not bool(torch.isfinite(schedule).all()):
            raise ValueError("`times` must be a non-empty (T,) tensor of finite step times")
        if not 0 < target < 1:
            raise ValueError(f"`target` must lie in (0, 1), got {target}")
        check_positive(gain, "`gain`")
        if not 0 < min_range <= max_range < 1:
            raise ValueError(
                f"need 0 < min_range <= max_range < 1, got min_range={min_range}, "
                f"max_range={max_range}"
            )
        if not min_range <= init <= max_range:
            raise ValueError(f"`init` must lie in [{min_range}, {max_range}], got {init}")
        if statistic not in ("out_of_range", "clipped"):
            raise ValueError(f"`statistic` must be 'out_of_range' or 'clipped', got {statistic!r}")
        self.target = target
        self.gain = gain
        self.min_range = min_range
        self.max_range = max_range
        self.statistic = statistic
        self.process_group = process_group
        steps = schedule.numel()
        self.register_buffer("times", schedule)
        self.register_buffer("ranges", torch.full((steps,), init, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(steps, dtype=torch.float64))
        self.register_buffer("hits", torch.zeros(steps, dtype=torch.float64))
        self.register_buffer("observed", torch.full((steps,), float("nan"), dtype=torch.float64))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"steps={self.times.numel()}, target={self.target}, gain={self.gain}, "
            f"min_range={self.min_range}, max_range={self.max_range}, "
            f"statistic={self.statistic!r}"
        )

    def step_index(self, t: Tensor) -> Tensor:
        """(B,) int64: index of the schedule entry nearest to each ``t`` (B,)."""
        distance = (t.detach().to(self.times)[:, None] - self.times[None, :]).abs()
        return distance.argmin(dim=1)

    def forward(
        self, log_ratio: Tensor, advantages: Tensor, batch: TransitionBatch | None = None
    ) -> SurrogateOutput:
        """Per-sample loss (B,) from the log-ratio (B,), advantages (B,) and ``batch.t``."""
        if batch is None or batch.t is None:
            raise ValueError(
                "AdaptiveClip needs each sample's step time: pass `t` (B,) in the loss call"
            )
        if self.ranges.device != log_ratio.device:  # a loss is rarely .to()'d: follow inputs
            self.to(log_ratio.device)
        index = self.step_index(batch.t)
        eps = self.ranges[index]
        # 1 -/+ eps in float64, then cast: the same rounding as PPOClip's Python floats
        lower, upper = (1 - eps).to(log_ratio.dtype), (1 + eps).to(log_ratio.dtype)
        ratio = bounded_exp(log_ratio)  # exp(r); finite past r = 20 (regclip.surrogate)
        unclipped = -advantages * ratio
        loss = torch.maximum(unclipped, -advantages * torch.clamp(ratio, lower, upper))
        with torch.no_grad():
            outside_high, outside_low = ratio > upper, ratio < lower
            clipped = ((advantages > 0) & outside_high) | ((advantages < 0) & outside_low)
            if self.training:
                hit = outside_high | outside_low if self.statistic == "out_of_range" else clipped
                moved = log_ratio.detach() != 0
                self.counts.index_add_(0, index, moved.to(self.counts.dtype))
                self.hits.index_add_(0, index, (hit & moved).to(self.hits.dtype))
        eps_b = eps.to(log_ratio.dtype)
        return SurrogateOutput(
            loss, ratio, clipped, torch.zeros_like(clipped), bounds=(eps_b, eps_b)
        )

    @torch.no_grad()
    def step(self) -> None:
        """Update every step's range from the counts since the last call, then reset them.

        Call once per optimizer step (or once per rollout, to target the fraction over its
        passes), on every rank: under ``torch.distributed`` the counts are all-reduced
        (one collective), so all ranks end with the same ranges. No host synchronisation.
        A frozen controller (:meth:`freeze`) resets its counts without changing ranges.
        """
        stats = torch.stack([self.counts, self.hits])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.process_group)
        counts, hits = stats[0], stats[1]
        seen = counts > 0
        fraction = hits / counts.clamp(min=1)
        self.observed.copy_(torch.where(seen, fraction, torch.full_like(fraction, float("nan"))))
        change = torch.where(seen, self.gain * (fraction - self.target), torch.zeros_like(counts))
        updated = (self.ranges * torch.exp(change)).clamp(self.min_range, self.max_range)
        self.ranges.copy_(torch.where(self.frozen, self.ranges, updated))
        self.counts.zero_()
        self.hits.zero_()
        self.num_steps.add_(1)

    def freeze(self) -> AdaptiveClip:
        """Stop adapting: :meth:`step` keeps the ranges (the loss is then PPO clip per step)."""
        self.frozen.fill_(True)
        return self

    def unfreeze(self) -> AdaptiveClip:
        self.frozen.fill_(False)
        return self

    @torch.no_grad()
    def set_ranges(self, ranges: Tensor | Sequence[float] | float) -> AdaptiveClip:
        """Overwrite the ranges ((T,) or a scalar), each in ``[min_range, max_range]`` as the
        constructor's ``init`` must be (NaN and inf are refused)."""
        values = torch.as_tensor(ranges, dtype=torch.float64).to(self.ranges.device)
        if values.ndim > 1 or values.numel() not in (1, self.ranges.numel()):
            raise ValueError(
                f"`ranges` has shape {tuple(values.shape)}; expected a scalar or "
                f"({self.ranges.numel()},), one range per schedule step"
            )
        values = values.expand_as(self.ranges)
        inside = (values >= self.min_range) & (values <= self.max_range)
        if not bool(inside.all()):
            bad = values[~inside][0].item()
            raise ValueError(
                f"`ranges` must lie in [{self.min_range}, {self.max_range}], got {bad}"
            )
        self.ranges.copy_(values)
        return self

    def metrics(self) -> dict[str, Tensor]:
        """Per-step 0-d tensors (no synchronisation): ``clip_range/<k>`` and
        ``clip_observed/<k>`` (the fraction at the last :meth:`step`, NaN if none)."""
        out = {f"clip_range/{k}": self.ranges[k] for k in range(self.ranges.numel())}
        out.update({f"clip_observed/{k}": self.observed[k] for k in range(self.observed.numel())})
        return out
