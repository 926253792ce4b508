"""Ready-made losses: the published methods and the paper's ablations.

=========================  ==================  ====================  ==========================
preset                     normalizer          reweighter            reproduces
=========================  ==================  ====================  ==========================
:func:`flow_grpo`          identity            uniform               Flow-GRPO ``train_sd3.py``
:func:`dance_grpo`         identity            uniform               DanceGRPO ``train_grpo_flux``
:func:`mean_revised`       mean-revised        uniform               GRPO-Guard ablation (bias)
:func:`ratio_norm`         RatioNorm           uniform               GRPO-Guard ablation
:func:`grpo_guard`         RatioNorm           inverse-dt (flow) /   GRPO-Guard (verl-omni
                                               equalizing (others)   ``GRPOGuardLoss``)
:func:`velocity_guard`     velocity-space      uniform               regclip's step-consistent
                                                                     extension
=========================  ==================  ====================  ==========================

:func:`grpo_guard_official` is the GRPO-Guard authors' own ``train_sd3_GRPO_Guard.py``
loss (batch-mean RatioNorm scale and bias, batch inverse-dt weight), for parity runs.

All take ``clip_range`` (symmetric PPO clip) and ``adv_clip`` (advantage clamp); the
kernel-aware ones take ``sde``/``eta`` or a ready ``kernel`` (e.g.
``FlowSDE.from_sigmas(scheduler.sigmas)``, needed for the t = 1 step of a Flow-SDE). Each
normalizer lives on its own scale, so each has its own default clip range: 1e-4 for the
raw log-ratio (Flow-GRPO, DanceGRPO), 2e-6 for RatioNorm (the public GRPO-Guard recipe),
and 2e-5 for the velocity-space ratio (2e-6 divided by |c_t| ~ 0.1, a 10-step schedule's
slope). These are starting points: measure the clip engagement (``clip/*`` metrics) and
use :func:`regclip.calibrate_clip_range` to set a target clip fraction.

Every function here is a thin wrapper: it fills a :class:`regclip.LossConfig` and calls
:meth:`regclip.GuardedPPOLoss.from_config`, the one way a loss is built from a name.
:data:`PRESETS` maps each name to its wrapper; :func:`from_name` builds by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from .kernels import TransitionKernel
from .loss import GuardedPPOLoss
from .loss_config import SDE, KLMaskNormalizer, LossConfig, Reweight, build_parts
from .ratio import BatchRatioNorm

__all__ = [
    "PRESETS",
    "adaptive_guard",
    "build",
    "dance_grpo",
    "flow_grpo",
    "from_name",
    "grpo_guard",
    "grpo_guard_official",
    "kl_mask",
    "mean_revised",
    "ratio_norm",
    "velocity_guard",
]


def build(
    config: LossConfig,
    kernel: TransitionKernel | None = None,
    times: Tensor | Sequence[float] | None = None,
) -> GuardedPPOLoss:
    """``GuardedPPOLoss.from_config(config, kernel, times=times)``."""
    return GuardedPPOLoss.from_config(config, kernel, times=times)


def flow_grpo(
    clip_range: float = 1e-4, adv_clip: float | None = 5.0, kl_coef: float = 0.0
) -> GuardedPPOLoss:
    """Vanilla Flow-GRPO: ``mean(max(-A rho, -A clip(rho)))`` with ``rho = exp(lp - old_lp)``.

    The KL term (``kl_coef`` is upstream's ``beta``) divides by sigma_t^2 as upstream does.
    """
    return build(LossConfig("flow_grpo", clip_range, adv_clip, kl_coef))


def dance_grpo(
    clip_range: float = 1e-4, adv_clip: float | None = 5.0, kl_coef: float = 0.0
) -> GuardedPPOLoss:
    """Vanilla DanceGRPO: the same clipped surrogate on Dance-SDE log-probs.

    DanceGRPO divides each timestep's loss by ``grad_accumulation * train_timesteps``;
    that is a constant of the trainer's accumulation, not of the loss.
    """
    return build(LossConfig("dance_grpo", clip_range, adv_clip, kl_coef))


def mean_revised(
    sde: SDE = "flow",
    clip_range: float = 1e-4,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """Ablation: bias removed (``log rho + b_t``), scale and weights untouched."""
    config = LossConfig("mean_revised", clip_range, adv_clip, kl_coef, sde, eta)
    return build(config, kernel)


def ratio_norm(
    sde: SDE = "flow",
    clip_range: float = 2e-6,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """Ablation: RatioNorm (bias and scale) without timestep reweighting."""
    return build(LossConfig("ratio_norm", clip_range, adv_clip, kl_coef, sde, eta), kernel)


def grpo_guard(
    sde: SDE = "flow",
    clip_range: float = 2e-6,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    reweight: Reweight = "auto",
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """GRPO-Guard: RatioNorm plus timestep reweighting.

    ``reweight="auto"`` picks ``inverse_dt`` for Flow-SDE (the public formula, which is
    equalizing there up to a constant) and ``equalizing`` (``1 / |c_t|``) for Dance-SDE and
    CPS, whose velocity slope is not proportional to dt. With ``sde="flow"`` this is
    exactly ``mean(max(-A rho, -A clip(rho)) / -dt)`` with
    ``rho = exp(s (log_prob - old_log_prob + mean_D(Delta^2) / (2 s^2)))``.
    """
    config = LossConfig("grpo_guard", clip_range, adv_clip, kl_coef, sde, eta, reweight)
    return build(config, kernel)


def velocity_guard(
    sde: SDE = "flow",
    clip_range: float = 2e-5,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """Step-consistent guard: ``mean_D(eps Delta) / |c_t|`` (normalization and reweighting
    in one), no further weights. Needs ``t`` in the call."""
    config = LossConfig("velocity_guard", clip_range, adv_clip, kl_coef, sde, eta)
    return build(config, kernel)


def grpo_guard_official(
    sde: SDE = "flow",
    clip_range: float = 2e-6,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
    source: Literal["auto", "closed_form", "log_prob"] = "auto",
) -> GuardedPPOLoss:
    """The GRPO-Guard authors' loss, ``scripts/train_sd3_GRPO_Guard.py`` with
    ``rationorm=True``, batch-mean scale and bias included (:class:`regclip.BatchRatioNorm`):
    ``mean(max(-A rho, -A clip(rho))) / mean_B(sqrt(-dt))^2`` with
    ``rho = exp(S (log_prob - old_log_prob + mean_{B,D}(Delta^2) / (2 S^2)))`` and
    ``S = mean_B(sqrt(-dt)) mean_B(sigma_t)``. The KL (``kl_coef``, upstream's ``beta``)
    divides by sigma_t^2 as that script does. ``source="log_prob"`` repeats the script's
    arithmetic (log-prob difference); the default takes the closed form when the means are
    given (equal up to rounding). Written for Flow-SDE batches at one step;
    ``sde``/``eta``/``kernel`` only set the loss's kernel (for diagnostics).
    """
    config = LossConfig("grpo_guard_official", clip_range, adv_clip, kl_coef, sde, eta)
    parts = build_parts(config, kernel)
    return GuardedPPOLoss.from_parts(parts._replace(normalizer=BatchRatioNorm(source)))


def adaptive_guard(
    sde: SDE = "flow",
    times: Tensor | Sequence[float] | None = None,
    target: float = 0.15,
    clip_range: float = 2e-6,
    gain: float = 1.0,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    reweight: Reweight = "auto",
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """GRPO-Guard (RatioNorm and :func:`grpo_guard`'s reweighting) with an
    :class:`regclip.AdaptiveClip` per-step clip range in place of the fixed one.

    ``times`` (T,) is the sampling schedule (each step's start time); every call needs
    ``t``. The ranges start at ``clip_range`` (GRPO-Guard's 2e-6) and move toward ``target``,
    the fraction of ratios outside ``[1 - eps_k, 1 + eps_k]`` at each step. Call
    ``loss.surrogate.step()`` after every optimizer step (on every rank).
    """
    config = LossConfig(
        "adaptive_guard", clip_range, adv_clip, kl_coef, sde, eta, reweight,
        target=target, gain=gain,
    )  # fmt: skip
    return build(config, kernel, times)


def kl_mask(
    bound: float = 1e-5,
    sde: SDE = "flow",
    normalizer: KLMaskNormalizer = "identity",
    reweight: Reweight = "auto",
    asymmetric: bool = True,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """Flow-DPPO's trust region: :class:`regclip.KLMask` with radius ``bound`` on
    ``mean_D((mu_theta - mu_old)^2) / (2 s_t^2)``, unclipped ``-A rho`` elsewhere.

    The defaults (vanilla ratio, uniform weights, asymmetric mask) are verl-omni's
    ``FlowDPPOLoss``; ``normalizer``/``reweight`` compose it with the guard's parts
    (``reweight="auto"`` is uniform for the ``identity`` and ``velocity`` ratios and
    GRPO-Guard's weight for ``ratio_norm``). Needs the means in the call.
    """
    config = LossConfig(
        "kl_mask", None, adv_clip, kl_coef, sde, eta, reweight,
        kl_bound=bound, kl_normalizer=normalizer, asymmetric=asymmetric,
    )  # fmt: skip
    return build(config, kernel)


PRESETS: dict[str, Callable[..., GuardedPPOLoss]] = {
    "flow_grpo": flow_grpo,
    "dance_grpo": dance_grpo,
    "mean_revised": mean_revised,
    "ratio_norm": ratio_norm,
    "grpo_guard": grpo_guard,
    "grpo_guard_official": grpo_guard_official,
    "velocity_guard": velocity_guard,
    "adaptive_guard": adaptive_guard,
    "kl_mask": kl_mask,
}
"""Name -> keyword wrapper (the names of :data:`regclip.loss_config.PRESET_SPECS`)."""


def from_name(name: str, **kwargs: object) -> GuardedPPOLoss:
    """Build a preset by name (keys of :data:`PRESETS`) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)
