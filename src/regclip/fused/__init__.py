"""Fused guard loss: the closed-form log-ratio, bias, surrogate, reweighting and metrics in
one Triton reduction kernel forward and one backward (:mod:`regclip.fused._kernels`).

It is a backend of :class:`regclip.GuardedPPOLoss`, not a second forward: the loss validates
its inputs once (:class:`regclip.TransitionBatch`) and hands the batch here. Use it through
``GuardedPPOLoss(..., fused=True)`` or ``LossConfig(..., fused=True)``.

* A loss it can never run (a KL term, a surrogate other than a plain
  :class:`regclip.ClippedSurrogate`, a log-ratio from log-probs) is refused when it is built,
  naming the reason (:func:`static_blocker`).
* A call it cannot run falls back to the eager PyTorch path, which is also the reference the
  tests compare against (:func:`call_blocker`): inputs not on CUDA (or CPU under
  ``TRITON_INTERPRET=1``), no means, latents not float32/bf16/fp16, a batch above
  ``MAX_BATCH``, or a gradient wanted for anything but ``mean``. ``LossOutput.backend``
  says which path ran.
Any normalizer and reweighter work: their per-sample scale and weight are computed eagerly
(``(B,)`` tensors) and fed to the kernel. For CUDA-graph capture build the loss with
``validate=False`` (value checks synchronise the device).
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from ..batch import TransitionBatch
from ..kernels import TransitionKernel
from ..output import LossOutput
from ..ratio import RatioNormalizer
from ..reweight import InverseDtWeight, TimestepReweighter, UniformWeight
from ..surrogate import ClippedSurrogate

__all__ = [
    "FusableLoss",
    "call_blocker",
    "fused_forward",
    "is_available",
    "static_blocker",
    "supports",
]


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


def static_blocker(loss_fn: FusableLoss) -> str | None:
    """Why ``loss_fn`` can never run fused (checked when the loss is built), or None."""
    if loss_fn.kl is not None:
        return "the fused backend has no KL term"
    if type(loss_fn.surrogate) is not ClippedSurrogate:
        return f"the fused backend runs the PPO-clip surrogate only, not {type(loss_fn.surrogate).__name__}"
    if loss_fn.normalizer.source == "log_prob" or not loss_fn.normalizer.fusable:
        return (
            f"the fused backend forms the log-ratio from the means; {loss_fn.normalizer!r} cannot"
        )
    return None


def call_blocker(loss_fn: FusableLoss, batch: TransitionBatch) -> str | None:
    """Why this call falls back to the eager path (device, dtype, size, inputs), or None."""
    from .function import MAX_BATCH

    mean, next_sample = batch.mean, batch.next_sample
    other = batch.old_mean if batch.noise is None else batch.noise
    if mean is None or next_sample is None or other is None:
        return "the call gives no means (log-probs only)"
    latents = (mean, other, next_sample)
    if not all(v.dtype in _DTYPES and v.device == mean.device for v in latents):
        return "latents are not float32/bf16/fp16 on one device"
    if not 0 < mean.shape[0] <= MAX_BATCH:
        return f"batch size {mean.shape[0]} is above {MAX_BATCH}"
    per_sample = (other, next_sample, batch.advantages, batch.std, batch.dt, batch.t)
    if any(v is not None and v.requires_grad for v in per_sample):
        return "only `mean` may require a gradient"
    if not is_available(mean.device):
        return f"Triton kernels are not available on {mean.device}"
    return None


def supports(loss_fn: FusableLoss, batch: TransitionBatch) -> bool:
    """Whether :func:`fused_forward` runs ``loss_fn`` on ``batch`` (module docstring)."""
    return static_blocker(loss_fn) is None and call_blocker(loss_fn, batch) is None


def fused_forward(loss_fn: FusableLoss, batch: TransitionBatch) -> LossOutput:
    """``loss_fn``'s result on the validated ``batch`` through the fused kernels; call only
    where :func:`supports` holds."""
    from .function import STAT_NAMES, SurrogateConfig, fused_guard

    mean, next_sample = batch.mean, batch.next_sample
    other = batch.old_mean if batch.noise is None else batch.noise
    assert mean is not None and next_sample is not None and other is not None
    normalizer, surrogate, reweighter = loss_fn.normalizer, loss_fn.surrogate, loss_fn.reweighter
    # the common scales and weights are computed in the kernel (no extra launches)
    scale_mode = {"none": 0, "std": 1}.get(normalizer.scale, 2)
    weight_mode = {UniformWeight: 0, InverseDtWeight: 1}.get(type(reweighter), 2)
    scale = normalizer.scale_factor(batch).float().contiguous() if scale_mode == 2 else None
    weight = reweighter(batch, normalizer).float().contiguous() if weight_mode == 2 else None
    cfg = SurrogateConfig(
        debias=normalizer.debias,
        scale_mode=scale_mode,
        weight_mode=weight_mode,
        adv_clip=loss_fn.adv_clip,
        lo_bound=None if surrogate.low is None else 1.0 - surrogate.low,
        hi_bound=None if surrogate.high is None else 1.0 + surrogate.high,
        dual=surrogate.dual,
    )
    f32 = torch.float32
    loss, log_ratio, ratio, clipped, rows, stats = fused_guard(
        mean, other, next_sample, batch.std.to(f32).contiguous(), batch.dt.to(f32).contiguous(),
        batch.advantages.to(f32).contiguous(), cfg, noise=batch.noise is not None,
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
        backend="fused",
    )
