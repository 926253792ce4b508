r"""Ratio normalizers: map a batch of transitions to the (normalized) log importance ratio.

Write the rollout draw as ``x = mu_old + s eps`` and ``Delta = mu_theta - mu_old``. Per
sample, with means over the D latent dims,

.. math::

    \log\rho = \frac{\overline{(x-\mu_{old})\Delta}}{s^2} - \frac{\overline{\Delta^2}}{2 s^2}
             = \frac{\overline{\epsilon\Delta}}{s} - b_t,
    \qquad b_t = \frac{\overline{\Delta^2}}{2 s^2}.

Every normalizer returns ``scale_t * (log rho + debias * b_t)``:

============================  ========  ==============  ==========================
normalizer                    debias    scale_t         closed form
============================  ========  ==============  ==========================
:func:`IdentityRatio`         no        1               ``log rho`` (vanilla)
:func:`MeanRevisedRatio`      yes       1               ``mean(eps Delta) / s``
:func:`RatioNorm`             yes       ``s``           ``mean(eps Delta)``
:func:`VelocityRatio`         yes       ``s / |c_t|``   ``mean(eps Delta) / |c_t|``
============================  ========  ==============  ==========================

``c_t = d mu / d v`` is the kernel's velocity slope. ``RatioNorm`` is GRPO-Guard's Eq. 8
(``s * (log_prob - old_log_prob + b_t)`` as the public implementations write it).

:class:`BatchRatioNorm` is the parity option for the GRPO-Guard authors' own script
(Flow-GRPO's ``scripts/train_sd3_GRPO_Guard.py``, ``rationorm=True``): one scale
``S = mean_B(sqrt(-dt)) * mean_B(sigma_t)`` and one bias ``mean_{B,D}(Delta^2) / (2 S^2)``
for the whole batch instead of per sample. Pair it with
:class:`regclip.reweight.BatchInverseDtWeight` (preset ``grpo_guard_official``).

The closed form needs ``mean``, ``old_mean`` and ``next_sample`` and never subtracts two
large log-probs; the log-prob route uses ``log_prob - old_log_prob`` (upstream Gaussian
convention) and, when debiasing, the means for ``b_t``. ``source="auto"`` takes the closed
form when the means are given and the log-probs otherwise.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .batch import TransitionBatch

__all__ = [
    "BatchRatioNorm",
    "IdentityRatio",
    "MeanRevisedRatio",
    "RatioNorm",
    "RatioNormalizer",
    "VelocityRatio",
]

Scale = Literal["none", "std", "velocity"]
Source = Literal["auto", "closed_form", "log_prob"]


def _mean_dims(value: Tensor) -> Tensor:
    return value.mean(dim=tuple(range(1, value.ndim)))


class RatioNormalizer(nn.Module):
    """``scale_t * (log rho + debias * b_t)``; see the module docstring for the variants.

    Args:
        debias: add ``b_t = mean_D(Delta^2) / (2 s^2)``, which re-centres the log-ratio
            at 0 under the rollout policy.
        scale: ``"none"``, ``"std"`` (multiply by s_t) or ``"velocity"`` (by s_t / |c_t|).
        source: where ``log rho`` comes from (``"auto"``, ``"closed_form"``, ``"log_prob"``).
    """

    fusable: bool = True
    """Whether the fused kernels (:mod:`regclip.fused`) compute this normalizer; a subclass
    whose formula they do not implement sets it to ``False`` (the eager path then runs)."""

    def __init__(self, *, debias: bool, scale: Scale = "none", source: Source = "auto") -> None:
        super().__init__()
        if scale not in ("none", "std", "velocity"):
            raise ValueError(f"`scale` must be 'none', 'std' or 'velocity', got {scale!r}")
        if source not in ("auto", "closed_form", "log_prob"):
            raise ValueError(
                f"`source` must be 'auto', 'closed_form' or 'log_prob', got {source!r}"
            )
        self.debias = debias
        self.scale = scale
        self.source = source

    @property
    def name(self) -> str:
        if not self.debias:
            return "identity"
        return {"none": "mean_revised", "std": "ratio_norm", "velocity": "velocity"}[self.scale]

    def extra_repr(self) -> str:
        return f"debias={self.debias}, scale={self.scale!r}, source={self.source!r}"

    def scale_factor(self, batch: TransitionBatch) -> Tensor:
        """(B,) the multiplier scale_t applied to ``log rho + debias * b_t``."""
        if self.scale == "none":
            return torch.ones_like(batch.std)
        if self.scale == "std":
            return batch.std
        return batch.std / batch.require_slope(f"{type(self).__name__}(scale='velocity')").abs()

    def velocity_gain(self, batch: TransitionBatch) -> Tensor:
        """(B,) k_t with ``d r / d v = k_t * eps / D`` at mu_theta = mu_old.

        ``d log rho / d mu = eps / (s D)`` there and ``d mu / d v = c_t``, so
        ``k_t = scale_t * c_t / s``. Reweighters that equalize timesteps divide by |k_t|.
        """
        slope = batch.require_slope("the velocity gain (an equalizing reweighter)")
        return self.scale_factor(batch) * slope / batch.std

    def _use_closed_form(self, batch: TransitionBatch) -> bool:
        if self.source == "closed_form":
            return True
        if self.source == "log_prob":
            return False
        return batch.has_means or not batch.has_log_probs

    def forward(self, batch: TransitionBatch) -> Tensor:
        """(B,) normalized log-ratio r; differentiable with respect to ``batch.mean``."""
        dtype = batch.compute_dtype()
        std = batch.std.to(dtype)
        if self._use_closed_form(batch):
            mean, old_mean, next_sample = batch.require_means(f"the closed-form {self.name} ratio")
            old = old_mean.detach().to(dtype)
            delta = mean.to(dtype) - old
            cross = _mean_dims((next_sample.detach().to(dtype) - old) * delta)
            numerator = cross if self.debias else cross - 0.5 * _mean_dims(delta**2)
            log_ratio = numerator / std**2
        else:
            if not batch.has_log_probs:
                raise ValueError(
                    f"the log-prob {self.name} ratio needs `log_prob` and `old_log_prob`"
                )
            assert batch.log_prob is not None and batch.old_log_prob is not None
            log_ratio = batch.log_prob.to(dtype) - batch.old_log_prob.to(dtype)
            if self.debias:
                mean, old_mean, _ = batch.require_means(f"the bias term of {self.name}")
                delta = mean.to(dtype) - old_mean.detach().to(dtype)
                log_ratio = log_ratio + _mean_dims(delta**2) / (2 * std**2)
        if self.scale == "none":
            return log_ratio
        return log_ratio * self.scale_factor(batch).to(dtype)


def IdentityRatio(source: Source = "auto") -> RatioNormalizer:
    """Vanilla Flow-GRPO / DanceGRPO: the raw log-ratio ``log rho``."""
    return RatioNormalizer(debias=False, scale="none", source=source)


def MeanRevisedRatio(source: Source = "auto") -> RatioNormalizer:
    """Ablation "mean-revised only": ``log rho + b_t`` (bias removed, scale kept)."""
    return RatioNormalizer(debias=True, scale="none", source=source)


def RatioNorm(source: Source = "auto") -> RatioNormalizer:
    """GRPO-Guard's RatioNorm (Eq. 8): ``s_t (log rho + b_t) = mean_D(eps Delta)``."""
    return RatioNormalizer(debias=True, scale="std", source=source)


def VelocityRatio(source: Source = "auto") -> RatioNormalizer:
    """Step-consistent variant: ``mean_D(eps Delta) / |c_t|``, the update in velocity units.

    Its spread under the rollout policy, ``sqrt(sum_D (v_theta - v_old)^2) / D``, and its
    gradient with respect to the velocity do not depend on the step.
    """
    return RatioNormalizer(debias=True, scale="velocity", source=source)


class BatchRatioNorm(RatioNormalizer):
    r"""RatioNorm with batch-mean scale and bias, as the GRPO-Guard authors' script has it.

    ``r_i = S (log rho_i + mean_{B,D}(Delta^2) / (2 S^2))`` with one scale for the batch,
    ``S = mean_B(sqrt(-dt)) * mean_B(sigma_t)`` (``sigma_t = s_t / sqrt(-dt)``). In
    ``scripts/train_sd3_GRPO_Guard.py`` the bias's mean over
    ``dim=tuple(range(1, log_prob.ndim))`` of a (B,) log-prob is an empty tuple, which torch
    reads as "every dim": the bias is one scalar averaged over the whole batch. When every
    sample is at the same step and the drifts ``Delta`` have similar size across the batch
    this is close to :func:`RatioNorm`; when they differ the gradients differ (the per-sample
    bias re-centres each sample's ratio, this one only the batch's average).

    ``source="log_prob"`` is the authors' route (``log_prob - old_log_prob`` in upstream's
    Gaussian convention, plus the bias from the means), the same arithmetic as theirs;
    ``"closed_form"`` forms ``log rho_i`` from the means (equal up to rounding, without the
    cancellation of two large log-probs); ``"auto"`` takes the closed form when the means
    are given. Not fusable: the fused kernels implement the per-sample bias only.
    """

    fusable = False

    def __init__(self, source: Source = "auto") -> None:
        super().__init__(debias=True, scale="std", source=source)

    @property
    def name(self) -> str:
        return "batch_ratio_norm"

    def batch_scale(self, batch: TransitionBatch) -> Tensor:
        """0-d ``S = mean_B(sqrt(-dt)) * mean_B(s_t / sqrt(-dt))``."""
        dtype = batch.compute_dtype()
        sqrt_dt = torch.sqrt(batch.dt.to(dtype).abs())
        return sqrt_dt.mean() * (batch.std.to(dtype) / sqrt_dt).mean()

    def scale_factor(self, batch: TransitionBatch) -> Tensor:
        return self.batch_scale(batch).expand(batch.std.shape).to(batch.std.dtype)

    def forward(self, batch: TransitionBatch) -> Tensor:
        dtype = batch.compute_dtype()
        scale = self.batch_scale(batch)
        mean, old_mean, next_sample = batch.require_means(f"the bias term of {self.name}")
        delta = mean.to(dtype) - old_mean.detach().to(dtype)
        if self._use_closed_form(batch):
            std = batch.std.to(dtype)
            old = old_mean.detach().to(dtype)
            cross = _mean_dims((next_sample.detach().to(dtype) - old) * delta)
            log_ratio = (cross - 0.5 * _mean_dims(delta**2)) / std**2
        else:
            if not batch.has_log_probs:
                raise ValueError(
                    f"the log-prob {self.name} ratio needs `log_prob` and `old_log_prob`"
                )
            assert batch.log_prob is not None and batch.old_log_prob is not None
            log_ratio = batch.log_prob.to(dtype) - batch.old_log_prob.to(dtype)
        bias = (delta**2).mean() / (2 * scale**2)
        return (log_ratio + bias) * scale
