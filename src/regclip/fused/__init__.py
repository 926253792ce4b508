"""Fused guard loss: the closed-form log-ratio, bias, surrogate, reweighting and metrics in
one Triton reduction kernel forward and one backward (:mod:`regclip.fused._kernels`).

Use it through ``GuardedPPOLoss(..., fused=True)`` (or :func:`regclip.presets` losses with
``loss.fused = True``). The fused path applies when

* the inputs are CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) and Triton
  imports,
* the log-ratio comes from the means (``mean``, ``next_sample`` and ``old_mean`` or the
  rollout ``noise``) in float32/bf16/fp16, and only ``mean`` requires a gradient,
* the loss has no KL term and a plain :class:`regclip.ClippedSurrogate`;

otherwise the eager PyTorch path runs (it is also the reference the tests compare against).
Any normalizer and reweighter work: their per-sample scale and weight are computed eagerly
(``(B,)`` tensors) and fed to the kernel. For CUDA-graph capture build the loss with
``validate=False`` (value checks synchronise the device).
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
from torch import Tensor

from .._validate import check_finite
from ..batch import TransitionBatch
from ..kernels import TransitionKernel
from ..output import LossOutput
from ..ratio import RatioNormalizer
from ..reweight import InverseDtWeight, TimestepReweighter, UniformWeight
from ..surrogate import ClippedSurrogate

__all__ = ["FusableLoss", "fused_forward", "is_available", "supports"]


class FusableLoss(Protocol):
    """The parts of a :class:`regclip.GuardedPPOLoss` the fused path reads (a protocol, so
    this backend does not import the loss that dispatches to it)."""

    normalizer: RatioNormalizer
    reweighter: TimestepReweighter
    surrogate: ClippedSurrogate
    kernel: TransitionKernel | None
    adv_clip: float | None
    validate: bool

    @property
    def kl(self) -> object | None:
        """The KL penalty, if any (the fused path has none)."""


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def is_available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernels can run on ``device``."""
    from .function import interpreting

    kind = torch.device(device).type
    return _HAS_TRITON and (kind == "cuda" or (kind == "cpu" and interpreting()))


def supports(
    loss_fn: FusableLoss,
    *,
    mean: Tensor | None,
    old_mean: Tensor | None,
    next_sample: Tensor | None,
    noise: Tensor | None,
    extra: tuple[object, ...] = (),
) -> bool:
    """Whether :func:`fused_forward` handles this loss and call (see the module docstring)."""
    from .function import MAX_BATCH

    if mean is None or next_sample is None or (old_mean is None) == (noise is None):
        return False
    other = old_mean if noise is None else noise
    assert other is not None
    latents = (mean, other, next_sample)
    return (
        loss_fn.kl is None
        and type(loss_fn.surrogate) is ClippedSurrogate
        and loss_fn.normalizer.source != "log_prob"
        and loss_fn.normalizer.fusable
        and all(v.dtype in _DTYPES and v.device == mean.device for v in latents)
        and mean.ndim >= 2
        and 0 < mean.shape[0] <= MAX_BATCH
        and not any(v.requires_grad for v in (other, next_sample))
        and not any(isinstance(v, Tensor) and v.requires_grad for v in extra)
        and is_available(mean.device)
    )


def fused_forward(
    loss_fn: FusableLoss,
    *,
    advantages: Tensor,
    std: Tensor | float,
    dt: Tensor | float,
    mean: Tensor | None,
    old_mean: Tensor | None,
    next_sample: Tensor | None,
    t: Tensor | float | None = None,
    log_prob: Tensor | None = None,
    old_log_prob: Tensor | None = None,
    noise: Tensor | None = None,
) -> LossOutput | None:
    """``loss_fn``'s result through the fused kernels, or ``None`` where they do not apply.

    Same keywords as :meth:`regclip.GuardedPPOLoss.forward` (``log_prob``/``old_log_prob``
    are accepted and unused: the closed form needs only the means).
    """
    from .function import STAT_NAMES, SurrogateConfig, fused_guard

    extra = (advantages, std, dt, t)
    if not supports(
        loss_fn, mean=mean, old_mean=old_mean, next_sample=next_sample, noise=noise, extra=extra
    ):
        return None
    assert mean is not None and next_sample is not None
    batch = TransitionBatch.build(
        advantages=advantages, std=std, dt=dt, t=t, mean=mean, old_mean=old_mean,
        next_sample=next_sample, kernel=loss_fn.kernel, validate=loss_fn.validate,
    )  # fmt: skip
    if noise is not None:
        if noise.shape != mean.shape:
            raise ValueError(
                f"`noise` has shape {tuple(noise.shape)}, expected {tuple(mean.shape)}"
            )
        if loss_fn.validate:
            check_finite(noise, "noise")
    normalizer, surrogate, reweighter = loss_fn.normalizer, loss_fn.surrogate, loss_fn.reweighter
    # the common scales and weights are computed in the kernel (no extra launches)
    scale_mode = {"none": 0, "std": 1}.get(normalizer.scale, 2)
    weight_mode = {UniformWeight: 0, InverseDtWeight: 1}.get(type(reweighter), 2)
    scale = normalizer.scale_factor(batch).float().contiguous() if scale_mode == 2 else None
    weight = reweighter(batch, normalizer).float().contiguous() if weight_mode == 2 else None
    if any(v is not None and v.requires_grad for v in (scale, weight)):
        return None
    cfg = SurrogateConfig(
        debias=normalizer.debias,
        scale_mode=scale_mode,
        weight_mode=weight_mode,
        adv_clip=loss_fn.adv_clip,
        lo_bound=None if surrogate.low is None else 1.0 - surrogate.low,
        hi_bound=None if surrogate.high is None else 1.0 + surrogate.high,
        dual=surrogate.dual,
    )
    other = old_mean if noise is None else noise
    assert other is not None
    f32 = torch.float32
    loss, log_ratio, ratio, clipped, rows, stats = fused_guard(
        mean, other, next_sample, batch.std.to(f32).contiguous(), batch.dt.to(f32).contiguous(),
        batch.advantages.to(f32).contiguous(), cfg, noise=noise is not None,
        scale=scale, weight=weight,
    )  # fmt: skip
    return LossOutput(
        loss=loss,
        log_ratio=log_ratio,
        ratio=ratio,
        clipped=clipped,
        weight=rows[4],
        advantages=rows[3],
        clip_bounds=(surrogate.low, surrogate.high),
        compute_metric_tensors=lambda: dict(zip(STAT_NAMES, stats.unbind(0), strict=True)),
    )
