"""The validated inputs of one loss call: a batch of rollout transitions.

:meth:`TransitionBatch.build` is the single place where user tensors are checked
(batch sizes, finiteness, signs) and broadcast, so every component downstream can trust
its inputs. Shapes: latents ``(B, ...)``, per-sample values ``(B,)``.

Old means need not be stored: the rollout draw is ``next_sample = old_mean + s * noise``,
so ``build(noise=...)`` (the rollout's standard-normal draw, regenerated from seeds with
:mod:`regclip.replay`) derives ``old_mean = next_sample - s * noise``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ._validate import as_advantages, as_batch, check_finite, check_same_batch, require
from .kernels import TransitionKernel
from .replay import old_mean_from_noise

__all__ = ["LowPrecisionMeanWarning", "LowPrecisionOldMeanWarning", "TransitionBatch"]


class LowPrecisionOldMeanWarning(UserWarning):
    """Old means stored in 16-bit floats: the guard's bias term is then rounding noise.

    At the rollout point the log-ratio should be 0; a bf16 old mean with rounding error
    ``e`` (relative 2^-9) adds ``mean_D(e^2) / (2 s^2)`` to the vanilla log-ratio and
    ``mean_D(e^2) / s`` to RatioNorm's, easily above the clip range at small ``s``.
    """


class LowPrecisionMeanWarning(UserWarning):
    """The current mean in 16-bit floats: the log-ratio is then mostly rounding noise.

    One update moves the mean by ``Delta`` of order ``1e-3 s`` or less; a bf16 mean carries
    a rounding error of ``2^-9 |mu|``, often larger, so ``Delta``, the log-ratio and the clip
    decisions follow the rounding instead of the update (a large share of the decisions
    flip against float32). Compute the mean in float32 (the kernels' ``evaluate`` does, from a
    float32 sample and a bf16 velocity).
    """


_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TransitionBatch:
    """Rollout transitions x_t -> x_{t+dt} scored under the current and rollout policies."""

    advantages: Tensor
    """(B,) advantages (after any clipping)."""
    std: Tensor
    """(B,) transition std s_t = sigma_t sqrt(-dt) (not sigma_t)."""
    dt: Tensor
    """(B,) step sizes, negative."""
    t: Tensor | None = None
    """(B,) times (scheduler sigmas) of the step's start."""
    mean: Tensor | None = None
    """(B, ...) current policy's proposal mean (carries the gradient)."""
    old_mean: Tensor | None = None
    """(B, ...) rollout policy's proposal mean."""
    next_sample: Tensor | None = None
    """(B, ...) the rollout's draw x_{t+dt}."""
    log_prob: Tensor | None = None
    """(B,) current log-prob, upstream Gaussian mean-over-dims convention."""
    old_log_prob: Tensor | None = None
    """(B,) rollout log-prob, same convention."""
    ref_mean: Tensor | None = None
    """(B, ...) reference (pretrained) policy's proposal mean, for the KL term."""
    kernel: TransitionKernel | None = None
    """The transition kernel, when the loss has one."""
    noise: Tensor | None = None
    """(B, ...) the rollout's standard-normal draw, given in place of ``old_mean``."""

    @cached_property
    def rollout_mean(self) -> Tensor | None:
        """The rollout policy's mean: ``old_mean`` as given, or regenerated from ``noise``
        (``next_sample - std * noise``, in at least float32) on first use, so a backend
        that reads the noise directly never materialises it."""
        if self.old_mean is not None or self.noise is None:
            return self.old_mean
        assert self.next_sample is not None
        return old_mean_from_noise(self.next_sample.detach(), self.std, self.noise)

    @cached_property
    def slope(self) -> Tensor | None:
        """(B,) the kernel's c_t = d mu / d v, when a kernel and ``t`` are known.

        Computed on first use, so kernels that cannot evaluate a step (a Flow-SDE at
        t = 1 without ``sigma_max``) only fail when a component needs the slope.
        """
        if self.kernel is None or self.t is None:
            return None
        return self.kernel.velocity_slope(self.t, self.dt)

    @property
    def has_means(self) -> bool:
        """Whether the closed-form log-ratio can be computed (mean, old_mean, next_sample)."""
        # identity tests: ``None in (tensors)`` would call Tensor.__eq__ on each
        return all(x is not None for x in (self.mean, self.rollout_mean, self.next_sample))

    @property
    def has_log_probs(self) -> bool:
        return self.log_prob is not None and self.old_log_prob is not None

    @classmethod
    def build(
        cls,
        *,
        advantages: Tensor,
        std: Tensor | float,
        dt: Tensor | float,
        t: Tensor | float | None = None,
        mean: Tensor | None = None,
        old_mean: Tensor | None = None,
        next_sample: Tensor | None = None,
        log_prob: Tensor | None = None,
        old_log_prob: Tensor | None = None,
        ref_mean: Tensor | None = None,
        kernel: TransitionKernel | None = None,
        validate: bool = True,
        noise: Tensor | None = None,
    ) -> TransitionBatch:
        """Check and broadcast the keyword tensors of a loss call.

        With ``validate=False`` only the cheap shape checks run (no device synchronisation
        for value checks): for tight training loops whose inputs are known to be good.

        ``noise`` (B, ...), the rollout's standard-normal draw, replaces ``old_mean``:
        ``old_mean = next_sample - std * noise`` in at least float32 (give one, not both).
        A 16-bit ``old_mean`` triggers a :class:`LowPrecisionOldMeanWarning`, a 16-bit
        ``mean`` a :class:`LowPrecisionMeanWarning`. The batch size is that of the latents
        (or of the log-probs when no latent is given), so a mismatched ``advantages`` is
        named as the culprit.

        ``std``, ``dt`` and ``t`` may be Python floats (one value for the whole batch);
        ``advantages`` may be a list or NumPy array (converted to a float tensor on the
        device of ``mean``). Latents must be floating point.
        """
        advantages = as_advantages(advantages, mean)
        if advantages.ndim != 1:
            raise ValueError(f"`advantages` must have shape (B,), got {tuple(advantages.shape)}")
        if advantages.shape[0] == 0:
            raise ValueError("`advantages` is empty: the batch needs at least one sample")
        latents = {
            "mean": mean,
            "old_mean": old_mean,
            "next_sample": next_sample,
            "ref_mean": ref_mean,
            "noise": noise,
        }
        scalars = {"log_prob": log_prob, "old_log_prob": old_log_prob}
        sized = [v for v in (*latents.values(), *scalars.values()) if v is not None and v.ndim]
        batch = sized[0].shape[0] if sized else advantages.shape[0]
        check_same_batch(batch, advantages, "advantages")
        if noise is not None and (old_mean is not None or next_sample is None):
            raise ValueError(
                "`noise` replaces `old_mean` (old_mean = next_sample - std * noise): give "
                "`next_sample` and `noise`, not `old_mean`"
            )
        if old_mean is not None and old_mean.dtype in _LOW_PRECISION:
            warnings.warn(
                f"`old_mean` is {old_mean.dtype}: its rounding error biases the log-ratio "
                "by mean(e^2) / (2 s^2), often more than the clip range. Store old means "
                "in float32, or pass the rollout `noise` (regclip.replay) instead.",
                LowPrecisionOldMeanWarning,
                stacklevel=3,
            )
        if mean is not None and mean.dtype in _LOW_PRECISION:
            warnings.warn(
                f"`mean` is {mean.dtype}: its rounding error (2^-9 of |mu| in bf16, 2^-11 in "
                "fp16) is larger than one update's change of the mean, so the log-ratio and the clip "
                "decisions follow the rounding. Compute the mean in float32 (kernel.evaluate "
                "upcasts a bf16 velocity).",
                LowPrecisionMeanWarning,
                stacklevel=3,
            )
        reference_shape = next((v.shape for v in latents.values() if v is not None), None)
        for name, value in latents.items():
            if value is None:
                continue
            check_same_batch(batch, value, name)
            if not value.is_floating_point():
                raise ValueError(f"`{name}` must be a floating-point tensor, got {value.dtype}")
            if value.ndim < 2 or value.shape != reference_shape:
                raise ValueError(
                    f"`{name}` has shape {tuple(value.shape)}; every latent argument must "
                    f"have the same shape (B, ...) with at least one latent dim, here "
                    f"{tuple(reference_shape or ())}"
                )
        for name, value in scalars.items():
            if value is not None and (value.ndim != 1 or value.shape[0] != batch):
                raise ValueError(f"`{name}` must have shape ({batch},), got {tuple(value.shape)}")
        if (log_prob is None) != (old_log_prob is None):
            raise ValueError("`log_prob` and `old_log_prob` must be given together")
        like = mean if mean is not None else advantages
        if validate:
            for name, value in {**latents, **scalars, "advantages": advantages}.items():
                if value is not None:
                    check_finite(value, name)
        std_b = as_batch(
            std, "std", batch, like, sign="positive" if validate else None, finite=validate
        )
        dt_b = as_batch(
            dt, "dt", batch, like, sign="negative" if validate else None, finite=validate
        )
        t_b = None
        if t is not None:
            t_b = as_batch(t, "t", batch, like, finite=validate)
            if validate and not bool(((t_b > 0) & (t_b <= 1)).all()):
                raise ValueError(
                    "`t` must lie in (0, 1] (t = 1 is pure noise, t = 0 data; at t = 0 the "
                    f"kernels divide by zero), got min {t_b.min().item():.3g}, "
                    f"max {t_b.max().item():.3g}"
                )
        return cls(
            advantages=advantages.to(std_b.dtype),
            std=std_b,
            dt=dt_b,
            t=t_b,
            mean=mean,
            old_mean=old_mean,
            next_sample=next_sample,
            log_prob=log_prob,
            old_log_prob=old_log_prob,
            ref_mean=ref_mean,
            kernel=kernel,
            noise=noise,
        )

    def require_slope(self, needed_by: str) -> Tensor:
        """The kernel's velocity slope c_t, or an error naming what is missing."""
        if self.slope is None:
            missing = "`t`" if self.t is None else "a `kernel`"
            raise ValueError(
                f"{needed_by} needs the kernel's velocity slope d mu / d v: give {missing} "
                "(GuardedPPOLoss(kernel=...) and t= in the call)"
            )
        return self.slope

    def require_means(self, needed_by: str) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, old_mean, next_sample) or an error naming the first missing one."""
        return (
            require(self.mean, "mean", needed_by),
            require(self.rollout_mean, "old_mean", needed_by),
            require(self.next_sample, "next_sample", needed_by),
        )

    def compute_dtype(self) -> torch.dtype:
        """At least float32: log-ratios of 1e-5 must not drown in bf16 rounding."""
        source = self.mean if self.mean is not None else self.std
        return torch.promote_types(source.dtype, torch.float32)
