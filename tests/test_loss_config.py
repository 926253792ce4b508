"""``LossConfig`` and the preset registry: one way to build a loss, same losses as the
keyword presets, every knob checked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from regclip import (
    AdaptiveClip,
    BatchInverseDtWeight,
    BatchRatioNorm,
    DanceSDE,
    FlowSDE,
    GuardedPPOLoss,
    IdentityRatio,
    KLMask,
    LossConfig,
    MeanRevisedRatio,
    PPOClip,
    VelocityRatio,
    make_kernel,
    presets,
)
from regclip.loss_config import PRESET_SPECS, PresetSpec, register_preset
from regclip.ratio import RatioNorm
from regclip.reweight import EqualizingWeight, InverseDtWeight, UniformWeight
from strategies import loss_inputs, make_rollout


def _describe(loss: GuardedPPOLoss) -> tuple[object, ...]:
    kl = None if loss.kl is None else (loss.kl.coef, loss.kl.variance)
    kernel = None if loss.kernel is None else (type(loss.kernel).__name__, loss.kernel.eta)
    return (
        loss.normalizer.name, type(loss.reweighter).__name__, loss.surrogate.low,
        loss.surrogate.high, kernel, loss.adv_clip, kl, loss.fused,
    )  # fmt: skip


TIMES = torch.tensor([1.0, 0.75, 0.5, 0.25])
"""A sampling schedule (each step's start time) for adaptive_guard."""


@pytest.mark.parametrize("name", sorted(PRESET_SPECS))
@pytest.mark.parametrize("sde", ["flow", "dance"])
def test_keyword_presets_and_configs_build_the_same_loss(name, sde):
    kwargs: dict[str, object] = {"kl_coef": 0.2}
    if name != "kl_mask":  # the mask has a bound, not a clip range
        kwargs["clip_range"] = 3e-3
    if name not in ("flow_grpo", "dance_grpo"):
        kwargs["sde"] = sde
    times = {"times": TIMES} if name == "adaptive_guard" else {}
    by_keyword = presets.from_name(name, **kwargs, **times)
    by_config = GuardedPPOLoss.from_config(LossConfig(name, **kwargs), **times)  # type: ignore[arg-type]
    assert _describe(by_keyword) == _describe(by_config)
    kernel = make_kernel(sde)
    r = make_rollout(5, batch=6, drift=0.1, t=0.5)
    inputs = {**loss_inputs(kernel, r), "ref_mean": torch.zeros(6, 3, 4, 4, dtype=torch.float64)}
    torch.testing.assert_close(by_keyword(**inputs).loss, by_config(**inputs).loss)


def test_registry_and_keyword_presets_list_the_same_names():
    """Every keyword preset is a LossConfig preset (and the trainer builds through configs)."""
    assert set(presets.PRESETS) == set(PRESET_SPECS)


ETA = {"flow": 0.45, "dance": 0.55}
"""Non-default noise levels: the kernel's ``eta`` must reach it through the config."""


def _by_hand(name: str, sde: str) -> GuardedPPOLoss:
    """Each preset written from the classes themselves (not from the registry)."""
    kernel = FlowSDE(eta=ETA["flow"]) if sde == "flow" else DanceSDE(eta=ETA["dance"])
    guard_weight = InverseDtWeight() if sde == "flow" else EqualizingWeight()
    parts = {
        "flow_grpo": (IdentityRatio(), UniformWeight(), PPOClip(1e-4), None),
        "dance_grpo": (IdentityRatio(), UniformWeight(), PPOClip(1e-4), None),
        "mean_revised": (MeanRevisedRatio(), UniformWeight(), PPOClip(1e-4), kernel),
        "ratio_norm": (RatioNorm(), UniformWeight(), PPOClip(2e-6), kernel),
        "grpo_guard": (RatioNorm(), guard_weight, PPOClip(2e-6), kernel),
        "grpo_guard_official": (BatchRatioNorm(), BatchInverseDtWeight(), PPOClip(2e-6), kernel),
        "velocity_guard": (VelocityRatio(), UniformWeight(), PPOClip(2e-5), kernel),
        "adaptive_guard": (
            RatioNorm(), guard_weight, AdaptiveClip(TIMES, init=2e-6, target=0.15), kernel
        ),
        "kl_mask": (IdentityRatio(), UniformWeight(), KLMask(1e-5, asymmetric=True), kernel),
    }[name]  # fmt: skip
    normalizer, reweighter, surrogate, kernel_part = parts
    return GuardedPPOLoss(normalizer, reweighter, surrogate, kernel=kernel_part, adv_clip=5.0)


def _part(module: torch.nn.Module | None) -> tuple[object, ...]:
    """A part's class, its public attributes and its buffers (as text: NaN equals NaN)."""
    if module is None:
        return (None,)
    public = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    buffers = {k: repr(v.tolist()) for k, v in module.state_dict().items()}
    return type(module), public, buffers


@pytest.mark.parametrize("name", sorted(PRESET_SPECS))
@pytest.mark.parametrize("sde", ["flow", "dance"])
def test_registry_builds_each_presets_parts_as_written_from_the_classes(name, sde):
    config = LossConfig(name, sde=sde, eta=ETA[sde])  # type: ignore[arg-type]
    built = GuardedPPOLoss.from_config(config, times=TIMES)
    expected = _by_hand(name, sde)
    for part in ("normalizer", "reweighter", "surrogate", "kernel"):
        assert _part(getattr(built, part)) == _part(getattr(expected, part)), part
    assert built.adv_clip == expected.adv_clip and built.kl is None


@pytest.mark.parametrize(
    ("name", "override", "field"),
    [("grpo_guard", {"kl_bound": 1e-3}, "kl_bound"), ("ratio_norm", {"target": 0.3}, "target"),
     ("kl_mask", {"clip_range": 1e-3}, "clip_range"), ("velocity_guard", {"gain": 2.0}, "gain"),
     ("adaptive_guard", {"asymmetric": False}, "asymmetric"),
     ("flow_grpo", {"kl_normalizer": "ratio_norm"}, "kl_normalizer")],
)  # fmt: skip
def test_a_knob_the_preset_does_not_read_is_refused_naming_it(name, override, field):
    with pytest.raises(ValueError, match=f"`{field}` does not apply to '{name}'"):
        LossConfig(name, **override)


def test_adaptive_guard_and_kl_mask_configs_carry_their_knobs():
    adaptive = GuardedPPOLoss.from_config(
        LossConfig("adaptive_guard", clip_range=1e-5, target=0.3, gain=0.5, sde="dance"),
        times=TIMES,
    )
    assert isinstance(adaptive.surrogate, AdaptiveClip)
    assert (adaptive.surrogate.target, adaptive.surrogate.gain) == (0.3, 0.5)
    assert adaptive.surrogate.ranges.tolist() == [1e-5] * 4
    assert type(adaptive.reweighter) is EqualizingWeight
    mask = GuardedPPOLoss.from_config(
        LossConfig("kl_mask", kl_bound=1e-3, kl_normalizer="ratio_norm", asymmetric=False)
    )
    assert isinstance(mask.surrogate, KLMask)
    assert (mask.surrogate.bound, mask.surrogate.asymmetric) == (1e-3, False)
    assert mask.normalizer.name == "ratio_norm" and type(mask.reweighter) is InverseDtWeight
    with pytest.raises(ValueError, match="`times`"):
        GuardedPPOLoss.from_config(LossConfig("adaptive_guard"))


def test_defaults_follow_each_preset():
    expected_clip = {"flow_grpo": 1e-4, "dance_grpo": 1e-4, "mean_revised": 1e-4,
                     "ratio_norm": 2e-6, "grpo_guard": 2e-6, "velocity_guard": 2e-5}  # fmt: skip
    for name, clip in expected_clip.items():
        loss = GuardedPPOLoss.from_config(LossConfig(name))
        assert loss.surrogate.low == loss.surrogate.high == clip, name
        assert (loss.kernel is None) == (name in ("flow_grpo", "dance_grpo")), name
    flow = GuardedPPOLoss.from_config(LossConfig("flow_grpo", kl_coef=0.1))
    assert flow.kl is not None and flow.kl.variance == "sigma"


@pytest.mark.parametrize(
    ("sde", "reweight", "expected"),
    [("flow", "auto", InverseDtWeight), ("dance", "auto", EqualizingWeight),
     ("cps", "auto", EqualizingWeight), ("flow", "equalizing", EqualizingWeight),
     ("dance", "inverse_dt", InverseDtWeight)],
)  # fmt: skip
def test_guard_reweight_choice(sde, reweight, expected):
    loss = GuardedPPOLoss.from_config(LossConfig("grpo_guard", sde=sde, reweight=reweight))
    assert type(loss.reweighter) is expected
    assert isinstance(loss.normalizer, type(RatioNorm()))


@pytest.mark.parametrize(
    ("override", "match"),
    [({"preset": "guard"}, "unknown preset"), ({"clip_range": 0.0}, "`clip_range`"),
     ({"adv_clip": -1.0}, "`adv_clip`"), ({"kl_coef": -0.1}, "`kl_coef`"),
     ({"sde": "ode"}, "`sde`"), ({"eta": 0.0}, "`eta`"), ({"reweight": "dt"}, "`reweight`"),
     ({"preset": "ratio_norm", "reweight": "equalizing"}, "`reweight`"),
     # NaN passes a bare `x <= 0` check, inf a bare `x > 0`: both are refused
     ({"clip_range": float("nan")}, "`clip_range`"), ({"clip_range": float("inf")}, "`clip_range`"),
     ({"adv_clip": float("nan")}, "`adv_clip`"), ({"kl_coef": float("nan")}, "`kl_coef`"),
     ({"kl_coef": float("inf")}, "`kl_coef`"), ({"eta": float("nan")}, "`eta`"),
     ({"eta": float("inf")}, "`eta`"), ({"preset": "adaptive_guard", "gain": float("inf")}, "`gain`"),
     ({"preset": "adaptive_guard", "target": float("nan")}, "`target`"),
     ({"preset": "kl_mask", "kl_bound": float("nan")}, "`kl_bound`"),
     ({"preset": "kl_mask", "kl_normalizer": "other"}, "`kl_normalizer`")],
)  # fmt: skip
def test_config_rejects_bad_knobs_naming_them(override, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**override)


def test_config_is_frozen_and_losses_get_fresh_parts():
    config = LossConfig("grpo_guard", sde="dance")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kl_coef = 1.0  # type: ignore[misc]
    a, b = GuardedPPOLoss.from_config(config), GuardedPPOLoss.from_config(config)
    assert a.normalizer is not b.normalizer and a.kernel is not b.kernel
    changed = GuardedPPOLoss.from_config(dataclasses.replace(config, kl_coef=0.5))
    assert changed.kl is not None and a.kl is None


def test_a_given_kernel_replaces_the_configs():
    kernel = make_kernel("flow", 0.5, sigma_max=0.9)
    loss = GuardedPPOLoss.from_config(LossConfig("grpo_guard"), kernel)
    assert loss.kernel is kernel
    assert GuardedPPOLoss.from_config(LossConfig("flow_grpo"), kernel).kernel is None


def test_register_preset_adds_once():
    spec = PresetSpec(lambda cfg: RatioNorm(), lambda cfg: UniformWeight(), 1e-5)
    try:
        register_preset("test_only_preset", spec)
        loss = GuardedPPOLoss.from_config(LossConfig("test_only_preset"))
        assert loss.surrogate.high == 1e-5
        with pytest.raises(ValueError, match="already registered"):
            register_preset("test_only_preset", spec)
    finally:
        PRESET_SPECS.pop("test_only_preset", None)
