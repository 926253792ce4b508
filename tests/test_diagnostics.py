"""Per-timestep diagnostics and clip-range calibration."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import (
    METRIC_NAMES,
    ClippedSurrogate,
    GuardedPPOLoss,
    IdentityRatio,
    InverseDtWeight,
    KLPenalty,
    TimestepDiagnostics,
    calibrate_clip_range,
    make_kernel,
    presets,
)
from strategies import loss_inputs, make_rollout, seeds


@given(seed=seeds)
def test_timestep_summary_matches_direct_statistics(seed):
    kernel = make_kernel("flow")
    loss_fn = presets.flow_grpo(clip_range=1e-3)
    diag = TimestepDiagnostics()
    ratios: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    clipped_pos: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for call in range(3):
        r = make_rollout(seed + call, batch=10, t=torch.linspace(0.2, 0.9, 10), dt=-0.05, drift=0.3)
        out = loss_fn(**loss_inputs(kernel, r))
        step = torch.arange(10) % 2
        diag.update(step, out)
        for s in (0, 1):
            sel = step == s
            ratios[s].append(out.ratio.detach()[sel])
            pos = out.advantages[sel] > 0
            clipped_pos[s].append(out.ratio.detach()[sel][pos] > 1 + 1e-3)
    summary = diag.summary()
    for s in (0, 1):
        all_r = torch.cat(ratios[s])
        assert summary[s]["count"] == all_r.numel()
        assert summary[s]["ratio/mean"] == pytest.approx(float(all_r.mean()), rel=1e-9)
        assert summary[s]["ratio/std"] == pytest.approx(float(all_r.std(unbiased=False)), rel=1e-6)
        assert summary[s]["clip/pos_high"] == pytest.approx(
            float(torch.cat(clipped_pos[s]).double().mean())
        )


@given(seed=seeds, target=st.floats(0.05, 0.9))
def test_calibrated_clip_range_clips_the_target_fraction(seed, target):
    log_ratio = 1e-5 * torch.randn(
        4000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    eps = calibrate_clip_range(log_ratio, target)
    outside = ((log_ratio.exp() - 1).abs() > eps).double().mean()
    assert float(outside) == pytest.approx(target, abs=2e-3)


def test_calibration_rejects_first_step_ratios():
    with pytest.raises(ValueError, match="first optimizer step"):
        calibrate_clip_range(torch.zeros(10), 0.2)


# A hand-built batch that hits every metric case. Log-ratios are given directly (the
# log-prob route of an identity normalizer), so each sample's ratio is known exactly.
# Clip [1 - 0.1, 1 + 0.2], dual clip 3, advantage clip 2.
LOW, HIGH, DUAL, ADV_CLIP = 0.1, 0.2, 3.0, 2.0
CASES = [  # (ratio, raw advantage, step): what the sample hits
    (1.5, 1.0, 0),  # A > 0, above 1 + high: clipped (pos_high)
    (0.8, 1.0, 0),  # A > 0, below 1 - low: out of range, unclipped (pos_low)
    (1.0, 3.0, 1),  # A > 0 in range, advantage clipped to 2
    (0.5, -1.0, 0),  # A < 0, below 1 - low: clipped (neg_low)
    (1.3, -1.0, 1),  # A < 0, above 1 + high, below the dual bound: unclipped (neg_high)
    (4.0, -0.5, 1),  # A < 0, above the dual bound: dual-clipped (neg_high, dual)
    (1.1, 0.0, 0),  # A = 0: neither sign
    (0.95, -4.0, 0),  # A < 0 in range, advantage clipped to -2
    (1.25, 2.0, 0),  # A > 0, above 1 + high: clipped (pos_high)
    (0.7, -0.3, 1),  # A < 0, below 1 - low: clipped (neg_low)
    (0.85, -2.0, 0),  # A < 0, below 1 - low: clipped (neg_low)
    (1.1, 0.5, 1),  # A > 0 in range
]
# Counts differ between the signs and the sides, overall (pos: 2 high, 1 low of 5; neg:
# 3 low, 2 high of 6) and per step, so a fraction counted over the wrong sign or side
# cannot come out equal by chance.
DTS = [-0.1, -0.2, -0.05, -0.1, -0.25, -0.1, -0.2, -0.05, -0.1, -0.15, -0.3, -0.08]


def _share(hits, within):
    """Share of ``within`` that ``hits`` (0 when ``within`` is empty)."""
    return sum(hits) / len(within) if within else 0.0


def _independent_counts(cases, dts=DTS):
    """Every metric of :data:`regclip.METRIC_NAMES`, counted in plain Python."""
    n = len(cases)
    rho = [c[0] for c in cases]
    adv = [max(-ADV_CLIP, min(ADV_CLIP, c[1])) for c in cases]
    pos = [i for i in range(n) if adv[i] > 0]
    neg = [i for i in range(n) if adv[i] < 0]
    above = {i for i in range(n) if rho[i] > 1 + HIGH}
    below = {i for i in range(n) if rho[i] < 1 - LOW}
    dual = {i for i in neg if rho[i] > DUAL}
    clipped = {i for i in pos if i in above} | {i for i in neg if i in below} | dual
    weight = [1 / abs(d) for d in dts]
    per_sample = []
    for r, a in zip(rho, adv, strict=True):
        value = max(-a * r, -a * min(max(r, 1 - LOW), 1 + HIGH))
        per_sample.append(min(value, -DUAL * a) if a < 0 else value)
    policy = sum(w * v for w, v in zip(weight, per_sample, strict=True)) / n
    log_r = [math.log(r) for r in rho]
    lr_mean = sum(log_r) / n
    lr_std = math.sqrt(sum((x - lr_mean) ** 2 for x in log_r) / n)
    r_mean = sum(rho) / n
    return {
        "loss/policy": policy,
        "ratio/mean": r_mean,
        "ratio/std": math.sqrt(sum((x - r_mean) ** 2 for x in rho) / n),
        "ratio/min": min(rho),
        "ratio/max": max(rho),
        "log_ratio/mean": lr_mean,
        "log_ratio/std": lr_std,
        "log_ratio/shift_z": -lr_mean / lr_std,
        "clip/frac": len(clipped) / n,
        "clip/pos_high": _share([i in above for i in pos], pos),
        "clip/pos_low": _share([i in below for i in pos], pos),
        "clip/neg_low": _share([i in below for i in neg], neg),
        "clip/neg_high": _share([i in above for i in neg], neg),
        "clip/dual_frac": len(dual) / n,
        "adv/mean": sum(adv) / n,
        "adv/abs_mean": sum(abs(a) for a in adv) / n,
        "adv/clip_frac": sum(a != c[1] for a, c in zip(adv, cases, strict=True)) / n,
        "weight/mean": sum(weight) / n,
    }, clipped


def _case_loss(cases, kl_coef=0.0):
    """The loss on ``cases``, with a KL term of known size when ``kl_coef`` > 0."""
    n = len(cases)
    loss_fn = GuardedPPOLoss(
        IdentityRatio(source="log_prob"),
        InverseDtWeight(),
        ClippedSurrogate(LOW, HIGH, dual=DUAL),
        adv_clip=ADV_CLIP,
        kl=KLPenalty(kl_coef) if kl_coef > 0 else None,
    )
    mean = torch.zeros(n, 2, dtype=torch.float64)
    ref_mean = torch.full((n, 2), 0.3, dtype=torch.float64)
    return loss_fn(
        advantages=torch.tensor([c[1] for c in cases], dtype=torch.float64),
        log_prob=torch.tensor([math.log(c[0]) for c in cases], dtype=torch.float64),
        old_log_prob=torch.zeros(n, dtype=torch.float64),
        std=0.1,
        dt=torch.tensor(DTS[:n], dtype=torch.float64),
        mean=mean,
        ref_mean=ref_mean if kl_coef > 0 else None,
    )


def test_every_metric_name_matches_an_independent_count():
    out = _case_loss(CASES, kl_coef=0.5)
    expected, clipped = _independent_counts(CASES)
    kl = 0.3**2 / (2 * 0.1**2)  # mean_D (mu - mu_ref)^2 / (2 s^2), same for every sample
    expected["loss/kl"] = kl
    expected["loss"] = expected["loss/policy"] + 0.5 * kl
    assert set(out.metrics) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        # metrics are float32
        assert out.metrics[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name
    assert out.clipped.tolist() == [i in clipped for i in range(len(CASES))]
    # every case is hit at least once, so a swapped side or sign cannot hide behind a 0
    for name in ("clip/pos_high", "clip/pos_low", "clip/neg_low", "clip/neg_high"):
        assert 0 < expected[name] < 1, name
    assert expected["clip/dual_frac"] > 0
    assert expected["adv/clip_frac"] > 0


def test_metrics_without_kl_have_no_kl_name():
    out = _case_loss(CASES)
    assert set(out.metrics) == set(METRIC_NAMES) - {"loss/kl"}
    assert out.metrics["loss"] == pytest.approx(_independent_counts(CASES)[0]["loss/policy"])


def test_timestep_diagnostics_match_an_independent_count_per_step():
    out = _case_loss(CASES)
    diag = TimestepDiagnostics()
    steps = torch.tensor([c[2] for c in CASES])
    diag.update(steps, out)
    diag.update(steps, out)  # accumulating twice leaves every fraction unchanged
    summary = diag.summary()
    assert sorted(summary) == [0, 1]
    for step in (0, 1):
        cases = [c for c in CASES if c[2] == step]
        dts = [d for c, d in zip(CASES, DTS, strict=True) if c[2] == step]
        expected, _ = _independent_counts(cases, dts)
        got = summary[step]
        assert got["count"] == 2 * len(cases)
        for name in ("ratio/mean", "ratio/std", "log_ratio/mean", "log_ratio/std", "clip/frac"):
            assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), (step, name)
        for name in ("clip/pos_high", "clip/pos_low", "clip/neg_low", "clip/neg_high"):
            assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), (step, name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_calibration_refuses_non_finite_log_ratios_naming_them(bad):
    log_ratio = 1e-5 * torch.randn(100, generator=torch.Generator().manual_seed(0))
    log_ratio[17] = bad
    with pytest.raises(ValueError, match="`log_ratio`"):
        calibrate_clip_range(log_ratio, 0.2)


def test_calibration_stays_finite_with_huge_finite_log_ratios():
    """exp(1e4) overflows even float64: the quantile is taken of the capped ratio, as the
    surrogates use it, so a few huge outliers cannot make the range inf or NaN."""
    log_ratio = 1e-3 * torch.randn(1000, generator=torch.Generator().manual_seed(1))
    log_ratio[:300] = 1e4
    eps = calibrate_clip_range(log_ratio, 0.2)  # the 0.8 quantile: a huge one
    assert math.isfinite(eps) and eps > 1
    clean = calibrate_clip_range(log_ratio[300:], 0.2)
    assert 0 < clean < 1e-2
