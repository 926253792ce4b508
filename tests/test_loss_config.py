"""``LossConfig`` and the preset registry: one way to build a loss, same losses as the
keyword presets, every knob checked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from regclip import GuardedPPOLoss, LossConfig, make_kernel, presets
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


@pytest.mark.parametrize("name", sorted(PRESET_SPECS))
@pytest.mark.parametrize("sde", ["flow", "dance"])
def test_keyword_presets_and_configs_build_the_same_loss(name, sde):
    kwargs = {"kl_coef": 0.2, "clip_range": 3e-3}
    if name not in ("flow_grpo", "dance_grpo"):
        kwargs["sde"] = sde
    by_keyword = presets.from_name(name, **kwargs)
    by_config = GuardedPPOLoss.from_config(LossConfig(name, **kwargs))
    assert _describe(by_keyword) == _describe(by_config)
    kernel = make_kernel(sde)
    r = make_rollout(5, batch=6, drift=0.1)
    inputs = {**loss_inputs(kernel, r), "ref_mean": torch.zeros(6, 3, 4, 4, dtype=torch.float64)}
    torch.testing.assert_close(by_keyword(**inputs).loss, by_config(**inputs).loss)


SURROGATE_PRESETS = {"adaptive_guard", "kl_mask"}
"""Keyword presets that take a registry preset's parts and swap in another surrogate."""


def test_registry_and_keyword_presets_list_the_same_names():
    assert set(presets.PRESETS) == set(PRESET_SPECS) | SURROGATE_PRESETS


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
     ({"preset": "ratio_norm", "reweight": "equalizing"}, "`reweight`")],
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
    spec = PresetSpec(RatioNorm, lambda cfg: UniformWeight(), 1e-5)
    try:
        register_preset("test_only_preset", spec)
        loss = GuardedPPOLoss.from_config(LossConfig("test_only_preset"))
        assert loss.surrogate.high == 1e-5
        with pytest.raises(ValueError, match="already registered"):
            register_preset("test_only_preset", spec)
    finally:
        PRESET_SPECS.pop("test_only_preset", None)
