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
"""

from __future__ import annotations

from typing import Literal

from .kernels import TransitionKernel, make_kernel
from .loss import GuardedPPOLoss, KLPenalty
from .ratio import (
    BatchRatioNorm,
    IdentityRatio,
    MeanRevisedRatio,
    RatioNorm,
    RatioNormalizer,
    VelocityRatio,
)
from .reweight import (
    BatchInverseDtWeight,
    EqualizingWeight,
    InverseDtWeight,
    TimestepReweighter,
    UniformWeight,
)
from .surrogate import PPOClip

__all__ = [
    "PRESETS",
    "dance_grpo",
    "flow_grpo",
    "from_name",
    "grpo_guard",
    "grpo_guard_official",
    "mean_revised",
    "ratio_norm",
    "velocity_guard",
]

SDE = Literal["flow", "dance", "cps"]


def _build(
    normalizer: RatioNormalizer,
    reweighter: TimestepReweighter,
    *,
    clip_range: float,
    adv_clip: float | None,
    kernel: TransitionKernel | None,
    kl_coef: float,
    kl_variance: Literal["transition", "sigma"] = "transition",
) -> GuardedPPOLoss:
    return GuardedPPOLoss(
        normalizer,
        reweighter,
        PPOClip(clip_range),
        kernel=kernel,
        adv_clip=adv_clip,
        kl=KLPenalty(kl_coef, kl_variance) if kl_coef > 0 else None,
    )


def flow_grpo(
    clip_range: float = 1e-4, adv_clip: float | None = 5.0, kl_coef: float = 0.0
) -> GuardedPPOLoss:
    """Vanilla Flow-GRPO: ``mean(max(-A rho, -A clip(rho)))`` with ``rho = exp(lp - old_lp)``.

    The KL term (``kl_coef`` is upstream's ``beta``) divides by sigma_t^2 as upstream does.
    """
    return _build(
        IdentityRatio(),
        UniformWeight(),
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=None,
        kl_coef=kl_coef,
        kl_variance="sigma",
    )


def dance_grpo(
    clip_range: float = 1e-4, adv_clip: float | None = 5.0, kl_coef: float = 0.0
) -> GuardedPPOLoss:
    """Vanilla DanceGRPO: the same clipped surrogate on Dance-SDE log-probs.

    DanceGRPO divides each timestep's loss by ``grad_accumulation * train_timesteps``;
    that is a constant of the trainer's accumulation, not of the loss.
    """
    return _build(
        IdentityRatio(),
        UniformWeight(),
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=None,
        kl_coef=kl_coef,
    )


def mean_revised(
    sde: SDE = "flow",
    clip_range: float = 1e-4,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """Ablation: bias removed (``log rho + b_t``), scale and weights untouched."""
    return _build(
        MeanRevisedRatio(),
        UniformWeight(),
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=kernel or make_kernel(sde, eta),
        kl_coef=kl_coef,
    )


def ratio_norm(
    sde: SDE = "flow",
    clip_range: float = 2e-6,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    kl_coef: float = 0.0,
    kernel: TransitionKernel | None = None,
) -> GuardedPPOLoss:
    """Ablation: RatioNorm (bias and scale) without timestep reweighting."""
    return _build(
        RatioNorm(),
        UniformWeight(),
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=kernel or make_kernel(sde, eta),
        kl_coef=kl_coef,
    )


def grpo_guard(
    sde: SDE = "flow",
    clip_range: float = 2e-6,
    adv_clip: float | None = 5.0,
    eta: float | None = None,
    reweight: Literal["auto", "inverse_dt", "equalizing"] = "auto",
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
    if reweight == "auto":
        reweight = "inverse_dt" if sde == "flow" else "equalizing"
    weights: dict[str, TimestepReweighter] = {
        "inverse_dt": InverseDtWeight(),
        "equalizing": EqualizingWeight(),
    }
    if reweight not in weights:
        raise ValueError(
            f"`reweight` must be 'auto', 'inverse_dt' or 'equalizing', got {reweight!r}"
        )
    return _build(
        RatioNorm(),
        weights[reweight],
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=kernel or make_kernel(sde, eta),
        kl_coef=kl_coef,
    )


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
    ``rationorm=True``, batch-mean scale and bias included (:class:`BatchRatioNorm`):
    ``mean(max(-A rho, -A clip(rho))) / mean_B(sqrt(-dt))^2`` with
    ``rho = exp(S (log_prob - old_log_prob + mean_{B,D}(Delta^2) / (2 S^2)))`` and
    ``S = mean_B(sqrt(-dt)) mean_B(sigma_t)``. The KL (``kl_coef``, upstream's ``beta``)
    divides by sigma_t^2 as that script does. ``source="log_prob"`` repeats the script's
    arithmetic (log-prob difference); the default takes the closed form when the means are
    given (equal up to rounding). Written for Flow-SDE batches at one step;
    ``sde``/``eta``/``kernel`` only set the loss's kernel (for diagnostics).
    """
    return _build(
        BatchRatioNorm(source),
        BatchInverseDtWeight(),
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=kernel or make_kernel(sde, eta),
        kl_coef=kl_coef,
        kl_variance="sigma",
    )


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
    return _build(
        VelocityRatio(),
        UniformWeight(),
        clip_range=clip_range,
        adv_clip=adv_clip,
        kernel=kernel or make_kernel(sde, eta),
        kl_coef=kl_coef,
    )


PRESETS = {
    "flow_grpo": flow_grpo,
    "dance_grpo": dance_grpo,
    "mean_revised": mean_revised,
    "ratio_norm": ratio_norm,
    "grpo_guard": grpo_guard,
    "grpo_guard_official": grpo_guard_official,
    "velocity_guard": velocity_guard,
}


def from_name(name: str, **kwargs: object) -> GuardedPPOLoss:
    """Build a preset by name (keys of :data:`PRESETS`) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)  # type: ignore[operator]
