"""Per-timestep diagnostics and clip-range calibration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import TimestepDiagnostics, calibrate_clip_range, make_kernel, presets
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
