"""The testbed's arms: a method (a regclip preset on a kernel), its setting, passes, replicate.

Method names: ``flow_grpo``, ``grpo_guard``, ``velocity_guard``, ``ratio_norm``,
``mean_revised``, ``flow_grpo_kl`` (vanilla plus a KL penalty), ``adaptive_guard`` (GRPO-Guard
with the adaptive clip controller), ``kl_mask`` (the KL-mask trust region) on Flow-SDE; a
``_dance`` suffix runs the same method on Dance-SDE (vanilla is then ``dance_grpo``).

A method's *setting* is the knob that moves it along its speed-gold curve: the clip multiple
for clipped methods, the KL-bound multiple for ``kl_mask``, the target clip fraction for
``adaptive_guard`` and the KL coefficient for ``flow_grpo_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import presets
from ..kernels import DanceSDE, FlowSDE, TransitionKernel
from ..loss import GuardedPPOLoss
from ..surrogate import NoClip
from .config import DemoConfig

__all__ = ["BASE_METHODS", "RunSpec", "build_loss", "kernel_for", "method_preset", "parse_method"]

BASE_METHODS: tuple[str, ...] = (
    "flow_grpo",
    "grpo_guard",
    "velocity_guard",
    "ratio_norm",
    "mean_revised",
    "flow_grpo_kl",
    "adaptive_guard",
    "kl_mask",
)
"""Every method on Flow-SDE; each also exists with the ``_dance`` suffix."""


def parse_method(name: str) -> tuple[str, str]:
    """``name`` -> (base method, sde) with sde ``"flow"`` or ``"dance"``."""
    base, sde = (
        (name.removesuffix("_dance"), "dance") if name.endswith("_dance") else (name, "flow")
    )
    if base not in BASE_METHODS:
        choices = ", ".join((*BASE_METHODS, *(f"{m}_dance" for m in BASE_METHODS)))
        raise ValueError(f"unknown method {name!r}; choose from {choices}")
    return base, sde


def method_preset(name: str) -> str:
    """The regclip preset behind method ``name``."""
    base, sde = parse_method(name)
    if base in ("flow_grpo", "flow_grpo_kl"):
        return "dance_grpo" if sde == "dance" else "flow_grpo"
    return base


@dataclass(frozen=True)
class RunSpec:
    """One GRPO run of the testbed."""

    method: str
    clip_scale: float | None
    """Clip range (KL bound for ``kl_mask``) as a multiple of the method's calibrated base;
    None: no clipping. Ignored by ``adaptive_guard``, which sets its own ranges."""
    passes: int
    seed: int
    """The replicate: it seeds the run's pretrained generator, its proxy rater and its GRPO
    noise, so two replicates share nothing random."""
    option: float | None = None
    """``adaptive_guard``: the target clip fraction (None: the preset's default);
    ``flow_grpo_kl``: the KL coefficient (None: the config's first). Unused otherwise."""

    @property
    def generator_seed(self) -> int:
        """Seed of the pretrained generator this run starts from (the replicate's own)."""
        return self.seed

    @property
    def rater_seed(self) -> int:
        """Seed of this run's proxy rater (the replicate's own)."""
        return self.seed

    @property
    def setting(self) -> str:
        """The knob along the method's speed-gold curve, as text: ``"0.25"``, ``"none"``,
        ``"target 0.15"`` (``adaptive_guard``) or ``"kl 0.02"`` (``flow_grpo_kl``)."""
        if self.base == "adaptive_guard":
            return f"target {self.option if self.option is not None else 0.15:g}"
        if self.base == "flow_grpo_kl":
            return f"kl {self.option:g}" if self.option is not None else "kl default"
        return "none" if self.clip_scale is None else f"{self.clip_scale:g}"

    @property
    def sde(self) -> str:
        return parse_method(self.method)[1]

    @property
    def base(self) -> str:
        return parse_method(self.method)[0]


def kernel_for(sde: str, cfg: DemoConfig, times: Tensor) -> TransitionKernel:
    """Flow-SDE on the schedule ``times`` (its t = 1 step as upstream) or Dance-SDE."""
    if sde == "flow":
        return FlowSDE.from_sigmas(times, eta=cfg.flow_eta)
    return DanceSDE(eta=cfg.dance_eta)


def build_loss(
    spec: RunSpec, cfg: DemoConfig, kernel: TransitionKernel, times: Tensor, base: float
) -> GuardedPPOLoss:
    """The loss of run ``spec``; ``base`` is the method's calibrated clip range (KL bound)."""
    preset = method_preset(spec.method)
    kl_coef = 0.0
    if spec.base == "flow_grpo_kl":
        kl_coef = spec.option if spec.option is not None else cfg.kl_coefs[0]
    sde = spec.sde
    if spec.base == "adaptive_guard":  # the preset's defaults but for the target
        target = {} if spec.option is None else {"target": spec.option}
        loss = presets.adaptive_guard(sde=sde, kernel=kernel, times=times[:-1], **target)  # type: ignore[arg-type]
    elif spec.base == "kl_mask":
        bound = base * (spec.clip_scale if spec.clip_scale is not None else 1e6)
        loss = presets.kl_mask(bound=bound, sde=sde, kernel=kernel)  # type: ignore[arg-type]
    else:
        kernel_arg = {} if preset in ("flow_grpo", "dance_grpo") else {"kernel": kernel, "sde": sde}
        clip = base * spec.clip_scale if spec.clip_scale is not None else 0.5
        loss = presets.from_name(preset, clip_range=clip, kl_coef=kl_coef, **kernel_arg)
    unclipped = spec.clip_scale is None and spec.base not in ("adaptive_guard", "kl_mask")
    return GuardedPPOLoss(  # the preset's parts, without per-call value checks (no syncs)
        loss.normalizer,
        loss.reweighter,
        NoClip() if unclipped else loss.surrogate,
        kernel=loss.kernel,
        adv_clip=loss.adv_clip,
        kl=loss.kl,
        validate=False,
    )
