"""Mechanics of ``regclip demo`` (the science lives in the committed runs, not here)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import DanceSDE, FlowSDE
from regclip.demo import cli, pretrain
from regclip.demo.analysis import value_at_level
from regclip.demo.config import METHOD_NAMES, PRESET_BUDGETS, DemoConfig
from regclip.demo.data import load_digits
from regclip.demo.dimension import left_shift_vs_dim
from regclip.demo.experiment import run_experiment
from regclip.demo.grpo import _Trainer, method_spec
from regclip.demo.merge import RATIO_PAIRS, pool_timesteps
from regclip.demo.metrics import proxy_reward
from regclip.demo.report import format_table, markdown_report
from regclip.demo.rollout import time_schedule

TINY = dataclasses.replace(DemoConfig(), **PRESET_BUDGETS["tiny"])


@pytest.fixture(scope="module", autouse=True)
def quick_cpu_and_private_cache(tmp_path_factory: pytest.TempPathFactory):
    """One thread (tiny convolutions run several times faster without spin-waiting on a busy
    2-core runner) and a pretraining cache in a temp folder, for every test here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "CACHE_DIR", tmp_path_factory.mktemp("cache"))
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The whole pipeline on the tiny budget."""
    out = tmp_path_factory.mktemp("demo")
    cfg = dataclasses.replace(TINY, methods=("flow_grpo", "velocity_guard"), dims=(64,))
    return out, run_experiment(cfg, out, log=lambda _: None)


def test_pipeline_writes_finite_results_with_the_documented_schema(tiny_run):
    out, summary = tiny_run
    on_disk = json.loads((out / "overopt.json").read_text())
    assert set(on_disk["methods"]) == {"flow_grpo", "velocity_guard"}
    for entry in on_disk["methods"].values():
        assert entry["seeds"] == [0]
        steps = [row["step"] for row in entry["eval"]]
        assert steps == list(range(TINY.steps + 1))
        for row in entry["eval"]:
            for key in ("proxy", "gold_acc", "nn_dist", "diversity", "drift", "kl"):
                assert math.isfinite(row[key]), key
        assert entry["eval"][0]["drift"] == 0.0  # step 0 is the pretrained model itself
        for table in (entry["ratio_by_timestep"], entry["clip_by_timestep"]):
            assert all(len(column) == TINY.num_steps for column in table.values())
        # passes >= 2 only: (passes - 1) * steps * batch transitions per timestep
        expected = (TINY.passes - 1) * TINY.steps * 10 * TINY.group_size
        assert entry["ratio_by_timestep"]["count"] == [expected] * TINY.num_steps
    assert "left_shift_vs_dim" in on_disk and on_disk["device"]
    images = np.load(out / "samples.npz")
    assert images["flow_grpo/start"].dtype == np.uint8
    assert images["flow_grpo/end"].shape == (10 * min(4, TINY.eval_per_class), 1, 16, 16)
    assert "flow_grpo" in format_table(summary)
    assert "| flow_grpo |" in markdown_report(summary)


def test_first_optimizer_pass_sees_ratio_exactly_one(tiny_run):
    pre = pretrain.load_or_pretrain(TINY, load_digits(TINY.size), torch.device("cpu"))
    for name in ("flow_grpo", "grpo_guard_dance"):
        trainer = _Trainer(method_spec(name, TINY), TINY, pre, 1e-3, 7)
        roll, _, adv = trainer.rollout()
        out, _ = trainer.loss(roll, adv, trainer.reference_means(roll))
        assert torch.equal(out.log_ratio, torch.zeros_like(out.log_ratio))


def test_digits_load_in_range_with_a_disjoint_split():
    digits = load_digits(32)
    assert digits.images.shape == (1797, 1, 32, 32)
    assert digits.images.min() >= -1 and digits.images.max() <= 1
    assert set(digits.labels.tolist()) == set(range(10))
    assert 0 < int(digits.split.sum()) < 1797


@given(st.integers(1, 40), st.floats(1.0, 8.0))
def test_time_schedule_runs_from_noise_to_data_monotonically(steps, shift):
    times = time_schedule(steps, shift)
    assert times.shape == (steps + 1,)
    assert times[0] == 1 and times[-1] == 0
    assert bool((times[1:] < times[:-1]).all())
    if shift == 1.0:
        assert torch.allclose(times, torch.linspace(1, 0, steps + 1))


def test_every_method_name_builds_its_kernel_and_loss():
    for name in METHOD_NAMES:
        spec = method_spec(name, TINY)
        kernel = spec.kernel(TINY)
        assert isinstance(kernel, DanceSDE if name.endswith("_dance") else FlowSDE)
        assert spec.shift == (1.0 if name.endswith("_uniform") else TINY.shift)
        assert (spec.loss(TINY, 1e-3).kl is not None) == (name == "flow_grpo_kl")
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("vanilla", TINY)


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


@given(st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_proxy_is_the_conditioned_logit_minus_the_best_other(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 10, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    reward = proxy_reward(_FixedLogits(logits), torch.zeros(batch, 1, 8, 8), labels)
    for i in range(batch):
        others = torch.cat([logits[i, : labels[i]], logits[i, labels[i] + 1 :]])
        assert math.isclose(
            float(reward[i]), float(logits[i, labels[i]] - others.max()), rel_tol=1e-6, abs_tol=1e-6
        )


@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=8, unique=True),
    st.floats(0, 1),
    st.floats(-3, 3),
    st.floats(-3, 3),
)
def test_value_at_level_interpolates_a_linear_metric_exactly(xs, frac, slope, offset):
    xs = sorted(xs)
    curve = [{"proxy": x, "gold": slope * x + offset} for x in xs]
    level = xs[0] + frac * (xs[-1] - xs[0])
    assert math.isclose(
        value_at_level(curve, "proxy", level, "gold"),
        slope * level + offset,
        rel_tol=1e-9,
        abs_tol=1e-9,
    )
    assert value_at_level(curve, "proxy", xs[-1] + 1.0, "gold") is None


@given(st.lists(st.integers(1, 30), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_pooled_timestep_stats_equal_those_of_the_concatenated_samples(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    samples = [
        torch.randn(n, generator=gen, dtype=torch.float64) * (1 + i) for i, n in enumerate(sizes)
    ]

    def table(x: torch.Tensor) -> dict[str, list[float]]:
        mean, std = float(x.mean()), float(x.std(unbiased=False))
        return {
            "mean": [mean],
            "std": [std],
            "log_mean": [mean],
            "log_std": [std],
            "raw_mean": [mean],
            "raw_std": [std],
            "frac": [mean],
        }

    pooled = pool_timesteps(
        [table(x) for x in samples], [[float(len(x))] for x in samples], RATIO_PAIRS
    )
    everything = torch.cat(samples)
    assert math.isclose(pooled["mean"][0], float(everything.mean()), abs_tol=1e-9)
    assert math.isclose(pooled["std"][0], float(everything.std(unbiased=False)), abs_tol=1e-7)
    assert math.isclose(pooled["frac"][0], float(everything.mean()), abs_tol=1e-9)


def test_left_shift_matches_its_closed_form_prediction():
    cfg = dataclasses.replace(TINY, dims=(1024, 16384), num_steps=4)
    result = left_shift_vs_dim(cfg)
    for measured, predicted in zip(result["measured"], result["predicted"], strict=True):
        np.testing.assert_allclose(measured, predicted, rtol=0.25, atol=0.03)
    assert 0.35 < result["fitted_exponent"] < 0.65


def test_command_line_overrides_reach_the_config():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--budget",
            "tiny",
            "--methods",
            "all",
            "--seeds",
            "3",
            "4",
            "--steps",
            "7",
            "--dims",
            "--device",
            "cpu",
        ]
    )
    cfg = cli.build_config(args)
    assert cfg.methods == METHOD_NAMES and cfg.seeds == (3, 4) and cfg.steps == 7
    assert cfg.dims == () and cfg.size == TINY.size
