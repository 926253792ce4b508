"""The testbed's arms: a method (a regclip preset on a kernel), its clip setting, passes, seed.

Method names: ``flow_grpo``, ``grpo_guard``, ``velocity_guard``, ``ratio_norm``,
``mean_revised``, ``flow_grpo_kl`` (vanilla plus a KL penalty), ``adaptive_guard`` (GRPO-Guard
with the adaptive clip controller), ``kl_mask`` (the KL-mask trust region) on Flow-SDE; a
``_dance`` suffix runs the same method on Dance-SDE (vanilla is then ``dance_grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import presets
from ..kernels import DanceSDE, FlowSDE, TransitionKernel
from ..loss import GuardedPPOLoss
from ..surrogate import NoClip
from .config import DemoConfig, seed_sources

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

    @property
    def pretrain_seed(self) -> int:
        return seed_sources(self.seed)[0]

    @property
    def reward_seed(self) -> int:
        return seed_sources(self.seed)[1]

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
    kl_coef = cfg.kl_coef if spec.base == "flow_grpo_kl" else 0.0
    sde = spec.sde
    if spec.base == "adaptive_guard":  # the preset's own defaults: the untuned question
        loss = presets.adaptive_guard(sde=sde, kernel=kernel, times=times[:-1])  # type: ignore[arg-type]
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
