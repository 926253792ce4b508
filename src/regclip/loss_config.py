"""``LossConfig`` and the one registry of named presets: the single way a loss is described.

A :class:`LossConfig` names a preset and its knobs (clip range, advantage clip, KL, SDE,
and the knobs of ``adaptive_guard`` and ``kl_mask``); :data:`PRESET_SPECS` says what each
preset is made of; :func:`build_parts` turns a config into the parts
:class:`regclip.GuardedPPOLoss` is built from (``GuardedPPOLoss.from_config(cfg)``). The
keyword functions of :mod:`regclip.presets` are thin wrappers around this. Configs are
frozen: to change a loss, build a new one from ``dataclasses.replace(cfg, ...)``.

Two things are not knobs but facts of the sampler, and are passed when the loss is built:
the transition ``kernel`` (replacing the one ``sde``/``eta`` make) and, for
``adaptive_guard``, the sampling schedule ``times`` (each step's start time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from ._validate import check_positive
from .adaptive import AdaptiveClip
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
from .trust_region import KLMask

__all__ = [
    "PRESET_SPECS",
    "LossConfig",
    "LossParts",
    "PresetSpec",
    "build_parts",
    "register_preset",
]

SDE = Literal["flow", "dance", "cps"]
Reweight = Literal["auto", "uniform", "inverse_dt", "equalizing"]
KLMaskNormalizer = Literal["identity", "ratio_norm", "velocity"]
Schedule = Tensor | Sequence[float]
_SDES = ("flow", "dance", "cps")
_REWEIGHTS = ("auto", "uniform", "inverse_dt", "equalizing")
_KL_MASK_NORMALIZERS: dict[str, Callable[[], RatioNormalizer]] = {
    "identity": IdentityRatio,
    "ratio_norm": RatioNorm,
    "velocity": VelocityRatio,
}


@dataclass(frozen=True)
class LossConfig:
    """A loss by name and knobs; every field is checked on construction.

    A knob that the chosen preset does not read (``kl_bound`` for ``grpo_guard``,
    ``clip_range`` for ``kl_mask``, ...) is refused when set away from its default, so
    nothing is silently ignored.
    """

    preset: str = "grpo_guard"
    """A key of :data:`PRESET_SPECS`."""
    clip_range: float | None = None
    """Symmetric PPO clip range (``adaptive_guard``: every step's initial range); ``None``:
    the preset's own default. Not read by ``kl_mask`` (see ``kl_bound``)."""
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
    """The timestep weight of ``grpo_guard``, ``adaptive_guard`` and ``kl_mask``; ``auto``
    is the preset's own: for the guards ``inverse_dt`` with Flow-SDE and ``equalizing``
    otherwise; for ``kl_mask`` the guards' with ``kl_normalizer="ratio_norm"``, else
    ``uniform`` (Flow-DPPO's)."""
    fused: bool = False
    """Run the fused Triton backend where it applies (:mod:`regclip.fused`)."""
    target: float = 0.15
    """``adaptive_guard``: the target fraction of ratios outside each step's range."""
    gain: float = 1.0
    """``adaptive_guard``: the controller gain (log-range change per unit fraction error)."""
    kl_bound: float = 1e-5
    """``kl_mask``: the trust radius on ``mean_D((mu - mu_old)^2) / (2 s_t^2)``."""
    kl_normalizer: KLMaskNormalizer = "identity"
    """``kl_mask``: the ratio normalizer (``identity`` is Flow-DPPO's)."""
    asymmetric: bool = True
    """``kl_mask``: mask only samples moving along their advantage (Flow-DPPO)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESET_SPECS:
            raise ValueError(
                f"unknown preset {self.preset!r}; choose one of {sorted(PRESET_SPECS)}"
            )
        if self.clip_range is not None:
            check_positive(self.clip_range, "`clip_range`")
        if self.adv_clip is not None:
            check_positive(self.adv_clip, "`adv_clip`")
        check_positive(self.kl_coef, "`kl_coef` (0 turns the KL term off)", strict=False)
        if self.sde not in _SDES:
            raise ValueError(f"`sde` must be one of {', '.join(_SDES)}, got {self.sde!r}")
        if self.eta is not None:
            check_positive(self.eta, "`eta`")
        if self.reweight not in _REWEIGHTS:
            raise ValueError(
                f"`reweight` must be one of {', '.join(_REWEIGHTS)}, got {self.reweight!r}"
            )
        if not 0 < self.target < 1:
            raise ValueError(f"`target` must lie in (0, 1), got {self.target}")
        check_positive(self.gain, "`gain`")
        check_positive(self.kl_bound, "`kl_bound`")
        if self.kl_normalizer not in _KL_MASK_NORMALIZERS:
            raise ValueError(
                f"`kl_normalizer` must be one of {', '.join(_KL_MASK_NORMALIZERS)}, "
                f"got {self.kl_normalizer!r}"
            )
        spec = PRESET_SPECS[self.preset]
        for name in _PRESET_KNOBS:
            if getattr(self, name) != _DEFAULTS[name] and name not in spec.knobs:
                readers = sorted(p for p, s in PRESET_SPECS.items() if name in s.knobs)
                raise ValueError(
                    f"`{name}` does not apply to {self.preset!r}; it is read by "
                    f"{', '.join(readers) or 'no preset'}"
                )


_PRESET_KNOBS = (
    "clip_range",
    "reweight",
    "target",
    "gain",
    "kl_bound",
    "kl_normalizer",
    "asymmetric",
)
"""The :class:`LossConfig` fields only some presets read (:attr:`PresetSpec.knobs`)."""
_DEFAULTS = {name: LossConfig.__dataclass_fields__[name].default for name in _PRESET_KNOBS}


def _ppo_clip(cfg: LossConfig, clip_range: float, times: Schedule | None) -> ClippedSurrogate:
    return PPOClip(clip_range)


def _adaptive_clip(cfg: LossConfig, clip_range: float, times: Schedule | None) -> AdaptiveClip:
    if times is None:
        raise ValueError(
            "adaptive_guard needs the sampling schedule: pass `times` (T,), each step's "
            "start time (e.g. sigmas[:-1]), when building the loss"
        )
    return AdaptiveClip(times, target=cfg.target, init=clip_range, gain=cfg.gain)


def _kl_mask(cfg: LossConfig, clip_range: float, times: Schedule | None) -> KLMask:
    return KLMask(cfg.kl_bound, asymmetric=cfg.asymmetric)


def _uniform(cfg: LossConfig) -> TimestepReweighter:
    return UniformWeight()


def _batch_inverse_dt(cfg: LossConfig) -> TimestepReweighter:
    return BatchInverseDtWeight()


_REWEIGHTERS: dict[str, Callable[[], TimestepReweighter]] = {
    "uniform": UniformWeight,
    "inverse_dt": InverseDtWeight,
    "equalizing": EqualizingWeight,
}


def _guard_weight(cfg: LossConfig) -> TimestepReweighter:
    """``auto``: ``inverse_dt`` for Flow-SDE (the public formula), ``equalizing`` otherwise."""
    choice = cfg.reweight
    if choice == "auto":
        choice = "inverse_dt" if cfg.sde == "flow" else "equalizing"
    return _REWEIGHTERS[choice]()


def _kl_mask_weight(cfg: LossConfig) -> TimestepReweighter:
    """``auto``: the weight that goes with the ratio: uniform for ``identity`` (Flow-DPPO,
    verl-omni's ``FlowDPPOLoss``) and ``velocity`` (step-consistent already), GRPO-Guard's
    for ``ratio_norm``."""
    if cfg.reweight == "auto" and cfg.kl_normalizer == "ratio_norm":
        return _guard_weight(cfg)
    return _REWEIGHTERS["uniform" if cfg.reweight == "auto" else cfg.reweight]()


def _fixed(make: Callable[[], RatioNormalizer]) -> Callable[[LossConfig], RatioNormalizer]:
    return lambda cfg: make()


def _kl_mask_normalizer(cfg: LossConfig) -> RatioNormalizer:
    return _KL_MASK_NORMALIZERS[cfg.kl_normalizer]()


@dataclass(frozen=True)
class PresetSpec:
    """What a named preset is made of: each part as a function of the config."""

    normalizer: Callable[[LossConfig], RatioNormalizer]
    reweighter: Callable[[LossConfig], TimestepReweighter]
    clip_range: float
    """Default clip range, on the normalizer's scale."""
    uses_kernel: bool = True
    """Whether the preset needs the transition kernel (``sde``/``eta`` or a given one)."""
    kl_variance: Literal["transition", "sigma"] = "transition"
    knobs: frozenset[str] = frozenset({"clip_range"})
    """The preset-specific :class:`LossConfig` fields it reads (others must stay default)."""
    surrogate: Callable[[LossConfig, float, Schedule | None], ClippedSurrogate] = _ppo_clip
    """``(cfg, clip_range, times) -> surrogate`` (``clip_range`` resolved to the default)."""


_GUARD = frozenset({"clip_range", "reweight"})
PRESET_SPECS: dict[str, PresetSpec] = {
    "flow_grpo": PresetSpec(_fixed(IdentityRatio), _uniform, 1e-4, False, "sigma"),
    "dance_grpo": PresetSpec(_fixed(IdentityRatio), _uniform, 1e-4, False),
    "mean_revised": PresetSpec(_fixed(MeanRevisedRatio), _uniform, 1e-4),
    "ratio_norm": PresetSpec(_fixed(RatioNorm), _uniform, 2e-6),
    "grpo_guard": PresetSpec(_fixed(RatioNorm), _guard_weight, 2e-6, knobs=_GUARD),
    "grpo_guard_official": PresetSpec(
        _fixed(BatchRatioNorm), _batch_inverse_dt, 2e-6, True, "sigma"
    ),
    "velocity_guard": PresetSpec(_fixed(VelocityRatio), _uniform, 2e-5),
    "adaptive_guard": PresetSpec(
        _fixed(RatioNorm),
        _guard_weight,
        2e-6,
        knobs=_GUARD | {"target", "gain"},
        surrogate=_adaptive_clip,
    ),
    "kl_mask": PresetSpec(
        _kl_mask_normalizer,
        _kl_mask_weight,
        2e-6,  # unused: the mask has no clip range
        knobs=frozenset({"reweight", "kl_bound", "kl_normalizer", "asymmetric"}),
        surrogate=_kl_mask,
    ),
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


def build_parts(
    cfg: LossConfig, kernel: TransitionKernel | None = None, times: Schedule | None = None
) -> LossParts:
    """Fresh parts for ``cfg``. ``kernel`` overrides the one ``cfg.sde``/``cfg.eta`` make
    (e.g. ``FlowSDE.from_sigmas(scheduler.sigmas)`` for the t = 1 step); ``times`` (T,) is
    the sampling schedule ``adaptive_guard`` needs (ignored by the other presets)."""
    spec = PRESET_SPECS[cfg.preset]
    if spec.uses_kernel and kernel is None:
        kernel = make_kernel(cfg.sde, cfg.eta)
    clip_range = spec.clip_range if cfg.clip_range is None else cfg.clip_range
    return LossParts(
        normalizer=spec.normalizer(cfg),
        reweighter=spec.reweighter(cfg),
        surrogate=spec.surrogate(cfg, clip_range, times),
        kernel=kernel if spec.uses_kernel else None,
        adv_clip=cfg.adv_clip,
        kl=KLPenalty(cfg.kl_coef, spec.kl_variance) if cfg.kl_coef > 0 else None,
        fused=cfg.fused,
    )
