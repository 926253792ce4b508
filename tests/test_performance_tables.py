"""``benchmarks/performance_tables.py``: the tables of ``docs/performance.md``'s
``regclip train`` section are what it renders from the committed result files, and the
targets' verdicts in those files are what it computes from their figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import performance_tables as pt


def test_the_docs_tables_are_the_rendering_of_the_committed_results():
    rendered = pt.load()
    blocks = dict(pt.BLOCK.findall(pt.DOC.read_text()))
    assert set(blocks) == set(rendered)
    for name, table in rendered.items():
        assert blocks[name] == table, (
            f"rerun: python benchmarks/performance_tables.py --write ({name})"
        )
    assert pt.write(pt.DOC, rendered) == pt.DOC.read_text()


def test_the_committed_verdicts_are_computed_from_the_committed_figures():
    for path in (pt.TRAINER, pt.COMPILED):
        for entry in json.loads(path.read_text())["archs"].values():
            assert entry["targets"] == pt.trainer_targets(entry)
    overhead = json.loads(pt.OVERHEAD.read_text())
    for entry in overhead["archs"].values():
        if "not_run" not in entry:
            assert entry["target"] == pt.overhead_target(entry["paired_ratio"])
            assert entry["target_profile"] == pt.profile_bound(entry)


def _entry(up_step: float, our_step: float, up_peak: float, our_peak: float) -> dict[str, Any]:
    return {
        "upstream": {"train_step_s": up_step, "iteration_s": 2 * up_step, "peak_gib": up_peak},
        "regclip": {"train_step_s": our_step, "iteration_s": 2 * our_step, "peak_gib": our_peak},
    }


def test_trainer_targets_met_and_missed():
    met = pt.trainer_targets(_entry(2.6, 2.0, 25.0, 24.0))
    assert met["train_step_speedup"] == {
        "target": 1.3, "measured": 1.3, "met": True, "time_cut_needed_pct": 0.0,
    }  # fmt: skip
    assert met["iteration_speedup"]["met"] and met["peak_gib"]["met"]
    missed = pt.trainer_targets(_entry(2.0, 2.0, 25.0, 25.5))
    step = missed["train_step_speedup"]
    assert not step["met"] and step["time_cut_needed_pct"] == pytest.approx(23.1)
    assert not missed["peak_gib"]["met"] and missed["peak_gib"]["excess_pct"] == 2.0


@pytest.mark.parametrize(
    ("ci95", "verdict"),
    [([1.002, 1.01], "met"), ([1.0101, 1.02], "missed"), ([1.006, 1.02], "not settled")],
)
def test_overhead_verdict_follows_the_interval(ci95: list[float], verdict: str):
    target = pt.overhead_target({"median": 1.008, "ci95": ci95})
    assert target["verdict"] == verdict and target["median_pct"] == 0.8


def _overhead(**attribution: Any) -> dict[str, Any]:
    """An overhead entry: a 2.5 s unpatched step of 2 s kernel time, and ``attribution``."""
    return {
        "paired_ratio": {"patched": "grpo_guard_fused", "median": 1.0, "ci95": [0.99, 1.01],
                         "pairs": 20},
        "attribution": {"device_step_ms": {"upstream": 2000.0}, "device_added_pct": 0.0,
                        "fused_loss_kernels_ms": 0.06, "fused_loss_pct": 0.003, **attribution},
        "train_step_s": {"upstream": 2.5},
        "target": {"verdict": "not settled", "median_pct": 0.0, "ci95_pct": [-1.0, 1.0]},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("host_s", "device_pct", "estimate", "bound", "verdict"),
    [
        (0.019, -0.1, 0.76, 0.95, "under 1 % by cProfile only"),
        (0.02, 0.15, 0.95, 1.15, "not shown"),
        (0.01, 0.3, 0.7, 0.8, "under 1 % by cProfile only"),
    ],
)
def test_profile_bound_divides_host_time_by_the_kernel_time_floor(
    host_s: float, device_pct: float, estimate: float, bound: float, verdict: str
):
    target = pt.profile_bound(_overhead(regclip_host_s=host_s, device_added_pct=device_pct))
    assert target["estimate_pct"] == pytest.approx(estimate)
    assert target["bound_pct"] == pytest.approx(bound) and target["verdict"] == verdict


def test_profile_bound_adds_the_loss_backward_to_the_larger_host_figure():
    backward = {"upstream": 0.002, "grpo_guard_fused": 0.004}
    full = _overhead(regclip_host_s=0.01, patch_wall_s=0.012, loss_backward_s=backward)
    target = pt.profile_bound(full)  # 12 ms + the patched 4 ms: of 2 s kernels, of 2.5 s
    assert target["bound_pct"] == pytest.approx(0.8) and target["estimate_pct"] == 0.64
    assert target["verdict"] == "met"
    full["attribution"]["regclip_host_s"] = 0.015
    assert pt.profile_bound(full)["bound_pct"] == pytest.approx(0.95)  # cProfile's 15 + 4
    no_backward = _overhead(regclip_host_s=0.01, patch_wall_s=0.012)
    assert pt.profile_bound(no_backward)["bound_pct"] == pytest.approx(0.6)
    assert pt.profile_bound(no_backward)["verdict"] == "under 1 % without the loss's backward"
    no_wall = _overhead(regclip_host_s=0.01, loss_backward_s=backward)
    assert pt.profile_bound(no_wall)["verdict"] == "under 1 % by cProfile only"
    over = _overhead(regclip_host_s=0.01, patch_wall_s=0.0165, loss_backward_s=backward)
    assert pt.profile_bound(over)["verdict"] == "not shown"  # 1.025 %


def test_overhead_table_shows_the_unprofiled_figures_only_where_measured():
    full = _overhead(regclip_host_s=0.01, patch_wall_s=0.012,
                     loss_backward_s={"upstream": 0.002, "grpo_guard_fused": 0.004})  # fmt: skip
    wall_only = _overhead(regclip_host_s=0.01, patch_wall_s=0.012)
    report = {"archs": {"sd3": full, "flux": wall_only, "qwen": {"not_run": "no time"}}}
    for entry in (full, wall_only):
        entry["target_profile"] = pt.profile_bound(entry)
    header, _, *rows = pt.overhead_table(report).splitlines()
    names = header.split(" | ")
    cells = [row.split(" | ") for row in rows]
    assert [len(c) for c in cells] == [len(names)] * 3
    wall = names.index("patch's calls timed whole (no profiler)")
    backward = names.index("loss backward, host: patched (unpatched)")
    assert [c[wall] for c in cells] == ["12.0 ms", "12.0 ms", "—"]
    assert [c[backward] for c in cells] == ["4.00 ms (2.00 ms)", "—", "—"]
