"""``benchmarks/trainer_vs_upstream.py --tiny``: the GPU benchmark's code path on CPU. The
regclip side always runs; the upstream side needs the Flow-GRPO 9745241 checkout
(``pytest -m upstream`` with ``REGCLIP_FLOW_GRPO_SRC``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _upstream import upstream_checkout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trainer_vs_upstream

SRC, _ = upstream_checkout("REGCLIP_FLOW_GRPO_SRC", "flow_grpo checkout (9745241)")
PHASES = {"rollout", "reward", "train_step", "iteration"}


def _run(tmp_path: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "tvu.json"
    argv = ["--tiny", "--device", "cpu", "--repeats", "2", "--out", str(out), *extra]
    code = trainer_vs_upstream.main(argv)
    report = json.loads(out.read_text())
    assert code == 0, report
    return report


def _check_side(side: dict, repeats: int) -> None:  # type: ignore[type-arg]
    assert set(side["phases"]) == PHASES
    for phase in side["phases"].values():
        assert len(phase["runs_s"]) == repeats and all(t > 0 for t in phase["runs_s"])
        assert phase["min_s"] <= phase["median_s"] <= phase["max_s"]
    assert side["train_step_s"] == side["phases"]["train_step"]["median_s"]
    assert side["iteration_s"] >= side["phases"]["train_step"]["min_s"]


def test_regclip_side_runs_every_phase_lever_and_the_batch_search(tmp_path: Path) -> None:
    report = _run(tmp_path, "--src", "")
    assert report["device"] == "cpu" and report["tiny"] and not report["upstream"]
    assert set(report["archs"]) == {"sd3", "flux"}
    for arch, entry in report["archs"].items():
        assert entry["repeats"] == 2 and "upstream" not in entry
        _check_side(entry["regclip"], 2)
        levers = entry["levers"]
        assert set(levers) == {
            "baseline", "gradient_checkpointing", "eager_loss", "loss_value_checks",
            "foreach_adamw", "timesteps_per_call_3",
        }  # fmt: skip
        assert all(v["train_step_s"] > 0 for v in levers.values())
        assert ("max_batch" in entry) == (arch == "sd3")
        first = entry["first_batch_log_ratio"]
        assert first["per_step"]["max_abs_log_ratio"] == 0.0  # the rollout's own layout
        assert 0.0 <= first["stacked_3"]["clipped_frac"] <= 1.0
    search = report["archs"]["sd3"]["max_batch"]["regclip"]
    assert search["largest_fit"] == search["cap"]  # nothing runs out of memory on the CPU


def test_largest_batch_brackets_the_memory_limit() -> None:
    for limit in (3, 5, 40, 200, 300):

        def probe(batch: int, limit: int = limit) -> None:
            if batch > limit:
                raise torch.OutOfMemoryError("simulated")

        found = trainer_vs_upstream.largest_batch(probe, torch.device("cpu"), 4, 256, budget=40)
        fit, oom = found["largest_fit"], found["first_oom"]
        assert fit is None or fit <= limit
        assert oom is None or oom > limit
        if limit < 256:
            assert oom is not None and oom - (fit or 0) <= max(found["resolution"], 4)
        else:
            assert fit == 256 and oom is None


def test_share_weights_shares_every_tensor_but_not_the_modules() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    twin = trainer_vs_upstream.share_weights(model)
    assert twin is not model and twin[0] is not model[0]
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert a.data_ptr() == b.data_ptr()


@pytest.mark.upstream
@pytest.mark.skipif(not SRC, reason="set REGCLIP_FLOW_GRPO_SRC to a Flow-GRPO 9745241 checkout")
def test_both_sides_against_the_real_upstream_scripts(tmp_path: Path) -> None:
    assert SRC is not None
    report = _run(tmp_path, "--src", SRC, "--skip-levers")
    assert report["upstream"]
    for arch, entry in report["archs"].items():
        assert entry["settings"]["upstream_script"] == f"scripts/train_{arch}.py"
        assert entry["settings"]["upstream_commit"].startswith("9745241")
        _check_side(entry["upstream"], 2)
        _check_side(entry["regclip"], 2)
        assert set(entry["speedup"]) == PHASES and all(v > 0 for v in entry["speedup"].values())
    assert report["archs"]["sd3"]["max_batch"]["upstream"]["largest_fit"] is not None
