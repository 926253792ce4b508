r"""``GuardedPPOLoss``: ratio normalizer + timestep reweighter + clipped surrogate.

For a batch of transitions (one per sample, any mix of timesteps)

.. math::

    L = \frac1B \sum_i w_{t_i}\, \ell\big(r_i, \mathrm{clip}(A_i, \pm a)\big)
        + \beta \frac1B \sum_i \mathrm{KL}_i,

with ``r`` the normalizer's log-ratio, ``w`` the reweighter's weight, ``l`` the surrogate and
the optional KL to a reference policy's mean (:class:`KLPenalty`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn

from ._validate import as_advantages, check_positive
from .batch import TransitionBatch
from .diagnostics import metric_tensors
from .kernels import TransitionKernel
from .kl import KLPenalty
from .loss_config import LossConfig, LossParts, build_parts
from .output import LossOutput
from .ratio import IdentityRatio, RatioNormalizer
from .reweight import TimestepReweighter, UniformWeight
from .surrogate import ClippedSurrogate, PPOClip

__all__ = ["GuardedPPOLoss", "KLPenalty", "LossOutput"]  # KLPenalty, LossOutput: re-exported


class GuardedPPOLoss(nn.Module):
    """A PPO-style policy loss for flow-matching GRPO, built from swappable parts.

    Args:
        normalizer: how the log-ratio is formed (:mod:`regclip.ratio`); default vanilla.
        reweighter: per-timestep weight (:mod:`regclip.reweight`); default uniform.
        surrogate: clipped surrogate (:mod:`regclip.surrogate`); default PPO clip 1e-4.
        kernel: the transition kernel, needed by :func:`regclip.ratio.VelocityRatio` and
            :class:`regclip.reweight.EqualizingWeight` (for its velocity slope).
        adv_clip: clamp advantages to ``[-adv_clip, adv_clip]`` (``None``: no clamp).
        kl: optional :class:`KLPenalty`; the call then needs ``ref_mean``.
        validate: check values (finite, signs) on every call; shape checks always run.
        fused: compute the closed-form log-ratio, surrogate, weights and metrics in one
            Triton reduction per direction (:mod:`regclip.fused`). A loss the fused backend
            can never run (a KL term, another surrogate, log-probs only) is refused here,
            naming the reason; a call it cannot run (CPU without Triton's interpreter, no
            means, a batch above its limit) runs eagerly, and ``LossOutput.backend`` says
            which path ran.

    Call with keyword tensors (see :class:`regclip.batch.TransitionBatch`): ``advantages``
    (B,) (a list or NumPy array is converted), ``mean``/``old_mean``/``next_sample`` (B, ...), ``std`` and ``dt`` ((B,) or
    scalar), and optionally ``t`` ((B,) or scalar, in (0, 1]), ``log_prob``/``old_log_prob`` (B,) in the upstream
    mean-over-dims Gaussian convention, ``ref_mean`` (B, ...), and ``noise`` (B, ...) in
    place of ``old_mean`` (the rollout's draw, ``old_mean = next_sample - std * noise``; see
    :mod:`regclip.replay`). Returns :class:`LossOutput`.
    """

    def __init__(
        self,
        normalizer: RatioNormalizer | None = None,
        reweighter: TimestepReweighter | None = None,
        surrogate: ClippedSurrogate | None = None,
        *,
        kernel: TransitionKernel | None = None,
        adv_clip: float | None = None,
        kl: KLPenalty | None = None,
        validate: bool = True,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if adv_clip is not None:
            check_positive(adv_clip, "`adv_clip`")
        self.normalizer = normalizer if normalizer is not None else IdentityRatio()
        self.reweighter = reweighter if reweighter is not None else UniformWeight()
        self.surrogate = surrogate if surrogate is not None else PPOClip(1e-4)
        self.kernel = kernel
        self.adv_clip = adv_clip
        self.kl = kl
        self.validate = validate
        self.fused = fused

    @property
    def fused(self) -> bool:
        """Whether calls run on the fused Triton backend where they can."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        if value:
            from .fused import static_blocker

            reason = static_blocker(self)
            if reason is not None:
                raise ValueError(f"fused=True: {reason}")
        self._fused = value

    @classmethod
    def from_config(
        cls,
        config: LossConfig,
        kernel: TransitionKernel | None = None,
        *,
        times: Tensor | Sequence[float] | None = None,
        validate: bool = True,
    ) -> GuardedPPOLoss:
        """The loss a :class:`regclip.loss_config.LossConfig` describes, with fresh parts.

        ``kernel`` replaces the one the config's ``sde``/``eta`` would make (presets that
        use no kernel ignore it); ``times`` (T,) is the sampling schedule (each step's start
        time), which ``adaptive_guard`` needs and the other presets ignore.
        """
        return cls.from_parts(build_parts(config, kernel, times), validate=validate)

    @classmethod
    def from_parts(cls, parts: LossParts, *, validate: bool = True) -> GuardedPPOLoss:
        """The loss made of ``parts`` (:func:`regclip.loss_config.build_parts`, or a copy
        with some parts replaced: ``parts._replace(surrogate=...)``)."""
        return cls(
            parts.normalizer,
            parts.reweighter,
            parts.surrogate,
            kernel=parts.kernel,
            adv_clip=parts.adv_clip,
            kl=parts.kl,
            validate=validate,
            fused=parts.fused,
        )

    def extra_repr(self) -> str:
        return f"adv_clip={self.adv_clip}, validate={self.validate}, fused={self.fused}"

    def forward(
        self,
        *,
        advantages: Tensor,
        std: Tensor | float,
        dt: Tensor | float,
        mean: Tensor | None = None,
        old_mean: Tensor | None = None,
        next_sample: Tensor | None = None,
        t: Tensor | float | None = None,
        log_prob: Tensor | None = None,
        old_log_prob: Tensor | None = None,
        ref_mean: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> LossOutput:
        advantages = as_advantages(advantages, mean)
        if self.kl is not None and ref_mean is None:
            raise ValueError("this loss has a KL penalty: pass `ref_mean`")
        batch = TransitionBatch.build(
            advantages=advantages,
            std=std,
            dt=dt,
            t=t,
            mean=mean,
            old_mean=old_mean,
            next_sample=next_sample,
            log_prob=log_prob,
            old_log_prob=old_log_prob,
            ref_mean=ref_mean,
            kernel=self.kernel,
            validate=self.validate,
            noise=noise,
        )
        if self.fused:
            from .fused import call_blocker, fused_forward  # lazy: Triton only when asked

            if call_blocker(self, batch) is None:
                return fused_forward(self, batch)
        raw_adv = batch.advantages
        adv = raw_adv if self.adv_clip is None else raw_adv.clamp(-self.adv_clip, self.adv_clip)
        log_ratio = self.normalizer(batch)
        weight = self.reweighter(batch, self.normalizer).to(log_ratio.dtype)
        if self.surrogate.needs_batch:  # e.g. AdaptiveClip (needs t), KLMask (the means)
            out = self.surrogate(log_ratio, adv.to(log_ratio.dtype), batch=batch)
        else:
            out = self.surrogate(log_ratio, adv.to(log_ratio.dtype))
        policy_loss = (weight * out.loss).mean()
        kl = None
        loss = policy_loss
        if self.kl is not None:
            kl = self.kl(batch).mean()
            loss = policy_loss + self.kl.coef * kl
        bounds: tuple[float | Tensor | None, float | Tensor | None] = (
            out.bounds if out.bounds is not None else (self.surrogate.low, self.surrogate.high)
        )
        metrics = partial(
            metric_tensors,
            loss=loss,
            policy_loss=policy_loss,
            kl=kl,
            log_ratio=log_ratio,
            ratio=out.ratio,
            clipped=out.clipped,
            dual_clipped=out.dual_clipped,
            advantages=adv,
            raw_advantages=raw_adv,
            weight=weight,
            low=bounds[0],
            high=bounds[1],
        )
        return LossOutput(
            loss=loss,
            log_ratio=log_ratio,
            ratio=out.ratio,
            clipped=out.clipped,
            weight=weight,
            advantages=adv,
            clip_bounds=bounds,
            compute_metric_tensors=metrics,
        )
