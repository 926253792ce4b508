"""``LossConfig`` and the one registry of named presets: the single way a loss is described.

A :class:`LossConfig` names a preset and its knobs (clip range, advantage clip, KL, SDE);
:data:`PRESET_SPECS` says what each preset is made of; :func:`build_parts` turns a config
into the parts :class:`regclip.GuardedPPOLoss` is built from
(``GuardedPPOLoss.from_config(cfg)``). The keyword functions of :mod:`regclip.presets`
are thin wrappers around this. Configs are frozen: to change a loss, build a new one
from ``dataclasses.replace(cfg, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .kernels import TransitionKernel, make_kernel
from .kl import KLPenalty
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
from .surrogate import ClippedSurrogate, PPOClip

__all__ = [
    "PRESET_SPECS",
    "LossConfig",
    "LossParts",
    "PresetSpec",
    "build_parts",
    "register_preset",
]

SDE = Literal["flow", "dance", "cps"]
Reweight = Literal["auto", "inverse_dt", "equalizing"]
_SDES = ("flow", "dance", "cps")
_REWEIGHTS = ("auto", "inverse_dt", "equalizing")


@dataclass(frozen=True)
class LossConfig:
    """A loss by name and knobs; every field is checked on construction."""

    preset: str = "grpo_guard"
    """A key of :data:`PRESET_SPECS`."""
    clip_range: float | None = None
    """Symmetric PPO clip range; ``None``: the preset's own default."""
    adv_clip: float | None = 5.0
    """Clamp advantages to ``[-adv_clip, adv_clip]``; ``None``: no clamp."""
    kl_coef: float = 0.0
    """Weight of the KL to a reference policy (0: no KL term; the call then needs
    ``ref_mean`` when > 0)."""
    sde: SDE = "flow"
    """The rollout's SDE, for the presets that use a kernel (ignored by the others)."""
    eta: float | None = None
    """The SDE's noise level; ``None``: its upstream default."""
    reweight: Reweight = "auto"
    """grpo_guard's timestep weight: ``auto`` is ``inverse_dt`` for Flow-SDE and
    ``equalizing`` otherwise."""
    fused: bool = False
    """Run the fused Triton backend where it applies (:mod:`regclip.fused`)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESET_SPECS:
            raise ValueError(
                f"unknown preset {self.preset!r}; choose one of {sorted(PRESET_SPECS)}"
            )
        if self.clip_range is not None and not self.clip_range > 0:
            raise ValueError(f"`clip_range` must be > 0, got {self.clip_range}")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"`adv_clip` must be > 0, got {self.adv_clip}")
        if not self.kl_coef >= 0:
            raise ValueError(
                f"`kl_coef` must be >= 0 (0 turns the KL term off), got {self.kl_coef}"
            )
        if self.sde not in _SDES:
            raise ValueError(f"`sde` must be one of {', '.join(_SDES)}, got {self.sde!r}")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"`eta` must be > 0, got {self.eta}")
        if self.reweight not in _REWEIGHTS:
            raise ValueError(
                f"`reweight` must be one of {', '.join(_REWEIGHTS)}, got {self.reweight!r}"
            )
        if self.reweight != "auto" and not PRESET_SPECS[self.preset].reweightable:
            raise ValueError(f"`reweight` applies to grpo_guard only, not {self.preset!r}")


@dataclass(frozen=True)
class PresetSpec:
    """What a named preset is made of."""

    normalizer: Callable[[], RatioNormalizer]
    reweighter: Callable[[LossConfig], TimestepReweighter]
    clip_range: float
    """Default clip range, on the normalizer's scale."""
    uses_kernel: bool = True
    """Whether the preset needs the transition kernel (``sde``/``eta`` or a given one)."""
    kl_variance: Literal["transition", "sigma"] = "transition"
    reweightable: bool = False
    """Whether ``LossConfig.reweight`` chooses its weight."""


def _uniform(cfg: LossConfig) -> TimestepReweighter:
    return UniformWeight()


def _batch_inverse_dt(cfg: LossConfig) -> TimestepReweighter:
    return BatchInverseDtWeight()


def _guard_weight(cfg: LossConfig) -> TimestepReweighter:
    choice = cfg.reweight
    if choice == "auto":
        choice = "inverse_dt" if cfg.sde == "flow" else "equalizing"
    return InverseDtWeight() if choice == "inverse_dt" else EqualizingWeight()


PRESET_SPECS: dict[str, PresetSpec] = {
    "flow_grpo": PresetSpec(IdentityRatio, _uniform, 1e-4, False, "sigma"),
    "dance_grpo": PresetSpec(IdentityRatio, _uniform, 1e-4, False),
    "mean_revised": PresetSpec(MeanRevisedRatio, _uniform, 1e-4),
    "ratio_norm": PresetSpec(RatioNorm, _uniform, 2e-6),
    "grpo_guard": PresetSpec(RatioNorm, _guard_weight, 2e-6, reweightable=True),
    "grpo_guard_official": PresetSpec(BatchRatioNorm, _batch_inverse_dt, 2e-6, True, "sigma"),
    "velocity_guard": PresetSpec(VelocityRatio, _uniform, 2e-5),
}
"""The registry: preset name -> its parts (see :mod:`regclip.presets` for each one's
published source)."""


def register_preset(name: str, spec: PresetSpec) -> None:
    """Add a preset to :data:`PRESET_SPECS` (a name may be registered once)."""
    if name in PRESET_SPECS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESET_SPECS[name] = spec


class LossParts(NamedTuple):
    """The constructor arguments of :class:`regclip.GuardedPPOLoss` for a config."""

    normalizer: RatioNormalizer
    reweighter: TimestepReweighter
    surrogate: ClippedSurrogate
    kernel: TransitionKernel | None
    adv_clip: float | None
    kl: KLPenalty | None
    fused: bool


def build_parts(cfg: LossConfig, kernel: TransitionKernel | None = None) -> LossParts:
    """Fresh parts for ``cfg``. ``kernel`` overrides the one ``cfg.sde``/``cfg.eta`` make
    (e.g. ``FlowSDE.from_sigmas(scheduler.sigmas)`` for the t = 1 step)."""
    spec = PRESET_SPECS[cfg.preset]
    if spec.uses_kernel and kernel is None:
        kernel = make_kernel(cfg.sde, cfg.eta)
    return LossParts(
        normalizer=spec.normalizer(),
        reweighter=spec.reweighter(cfg),
        surrogate=PPOClip(spec.clip_range if cfg.clip_range is None else cfg.clip_range),
        kernel=kernel if spec.uses_kernel else None,
        adv_clip=cfg.adv_clip,
        kl=KLPenalty(cfg.kl_coef, spec.kl_variance) if cfg.kl_coef > 0 else None,
        fused=cfg.fused,
    )
