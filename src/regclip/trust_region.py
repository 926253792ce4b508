r"""A trust region on the exact per-step divergence, in place of ratio clipping.

Every transition kernel (Flow-SDE, Dance-SDE, CPS) is a Gaussian ``N(mu, s_t^2 I)`` whose
std does not depend on the policy, so the divergence of the current policy from the
rollout policy at a sample's step is exact and cheap. Per sample, with ``D`` latent dims,

.. math::

    \mathrm{KL}_i = \frac{\overline{(\mu_\theta - \mu_{old})^2}}{2 s_t^2}
                  = \frac1D\,\mathrm{KL}\big(\mathcal N(\mu_\theta, s_t^2 I)\,\|\,
                    \mathcal N(\mu_{old}, s_t^2 I)\big),

the mean over the ``D`` dims (the bar): the exact KL divided by ``D``. It equals the bias
``b_t`` that RatioNorm removes (:mod:`regclip.ratio`). The mean, not the sum, is the
convention of the upstream log-probs and of verl-omni's ``FlowDPPOLoss`` (which divides by
``(std_dev_t sqrt_dt)^2 = s_t^2`` and averages over dims); with it a bound means the same
per-dimension drift at every latent size. A bound ``delta`` on this mean is a bound
``D delta`` on the exact KL.

:class:`KLMask` (Flow-DPPO, arXiv 2606.11025: an asymmetric divergence mask) minimises

.. math::

    \ell_i = -(1 - M_i)\, A_i \rho_i, \qquad
    M_i = [\mathrm{KL}_i > \delta]\ \wedge\
          \big([A_i > 0 \wedge \rho_i > 1] \vee [A_i < 0 \wedge \rho_i < 1]\big),

with ``rho = exp(r)`` the normalizer's (unclipped) ratio: a sample stops contributing (loss
and gradient exactly 0) only when its step has left the trust region *and* its ratio has
moved in the direction its advantage pushes; corrective updates stay active, as in PPO.
``asymmetric=False`` masks every sample with ``KL_i > delta``. With the vanilla ratio and
uniform weights this is verl-omni's ``FlowDPPOLoss`` (``add_kl_coefficient=True``) up to
its ``>=`` at the threshold, a measure-zero difference. With another normalizer the
direction test uses that normalizer's ratio (RatioNorm: ``mean_D(eps Delta) > 0``, the
bias-free direction), and the reweighter multiplies ``l_i`` as for any surrogate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_positive
from .batch import TransitionBatch
from .surrogate import ClippedSurrogate, SurrogateOutput, bounded_exp

__all__ = ["KLMask", "transition_kl"]


def transition_kl(batch: TransitionBatch) -> Tensor:
    """(B,) ``mean_D((mu_theta - mu_old)^2) / (2 s_t^2)``, detached, in at least float32."""
    if batch.mean is None or batch.rollout_mean is None:
        missing = [n for n in ("mean", "old_mean") if getattr(batch, n) is None]
        raise ValueError(
            f"the KL mask needs the transition means: pass {', '.join(f'`{m}`' for m in missing)}"
            " (or `noise` with `next_sample` in place of `old_mean`)"
        )
    dtype = batch.compute_dtype()
    delta = batch.mean.detach().to(dtype) - batch.rollout_mean.detach().to(dtype)
    var = batch.std.detach().to(dtype) ** 2
    return (delta**2).mean(dim=tuple(range(1, delta.ndim))) / (2 * var)


class KLMask(ClippedSurrogate):
    """Flow-DPPO's divergence mask: ``-(1 - M) A rho`` (module docstring for ``M``).

    Args:
        bound: the trust radius ``delta`` > 0 on the per-dimension KL (verl-omni's
            ``kl_mask_threshold``, default 1e-5 there).
        asymmetric: mask only samples moving along their advantage (Flow-DPPO); ``False``
            masks every sample beyond the bound.

    Needs ``mean`` and ``old_mean`` (or ``noise``) in the loss call. ``clipped`` marks the
    masked samples, so ``clip/frac`` is the masked fraction; ``low``/``high`` are ``None``.
    """

    needs_batch = True

    def __init__(self, bound: float, *, asymmetric: bool = True) -> None:
        super().__init__(None, None)
        check_positive(bound, "KL `bound`")
        self.bound = bound
        self.asymmetric = asymmetric

    def extra_repr(self) -> str:
        return f"bound={self.bound}, asymmetric={self.asymmetric}"

    def mask(self, log_ratio: Tensor, advantages: Tensor, kl: Tensor) -> Tensor:
        """(B,) bool ``M``: the samples whose contribution is removed."""
        outside = kl > self.bound
        if not self.asymmetric:
            return outside
        r = log_ratio.detach()
        return outside & (((advantages > 0) & (r > 0)) | ((advantages < 0) & (r < 0)))

    def forward(
        self, log_ratio: Tensor, advantages: Tensor, batch: TransitionBatch | None = None
    ) -> SurrogateOutput:
        """Per-sample loss (B,) from the log-ratio (B,), advantages (B,) and the batch means."""
        if batch is None:
            raise ValueError("KLMask needs the batch: use it as a GuardedPPOLoss surrogate")
        kl = transition_kl(batch).to(log_ratio.dtype)
        ratio = bounded_exp(log_ratio)  # exp(r); finite past r = 20 (regclip.surrogate)
        with torch.no_grad():
            masked = self.mask(log_ratio, advantages, kl)
        loss = torch.where(masked, torch.zeros_like(ratio), -advantages * ratio)
        return SurrogateOutput(loss, ratio, masked, torch.zeros_like(masked))
