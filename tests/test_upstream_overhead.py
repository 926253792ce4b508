"""``benchmarks/upstream_overhead.py --tiny``: the GPU benchmark's code path on CPU, against
the real upstream scripts (``pytest -m upstream`` with ``REGCLIP_FLOW_GRPO_SRC``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _upstream import skip_on_missing_dependency, upstream_checkout

SRC, pytestmark = upstream_checkout("REGCLIP_FLOW_GRPO_SRC", "flow_grpo checkout (9745241)")


def test_sd3_and_flux_overhead_benchmark_tiny_dry_run(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import upstream_overhead

    assert SRC is not None
    if not (Path(SRC) / "scripts" / "train_flux.py").is_file():
        pytest.skip("the benchmark drives train_flux.py: it needs Flow-GRPO 9745241")
    out = tmp_path / "overhead.json"
    with skip_on_missing_dependency(SRC):
        code = upstream_overhead.main(
            ["--tiny", "--device", "cpu", "--repeats", "1", "--src", SRC, "--out", str(out)]
        )
    report = json.loads(out.read_text())
    assert code == 0, report
    assert report["tiny"] and report["gpu"] is None and set(report["archs"]) == {"sd3", "flux"}
    for arch, entry in report["archs"].items():
        assert entry["script"] == f"scripts/train_{arch}.py"
        assert entry["upstream_commit"].startswith("9745241")
        assert set(entry["train_step_s"]) == {"upstream", "grpo_guard", "grpo_guard_fused"}
        assert all(v > 0 for v in entry["train_step_s"].values())
        assert set(entry["patch_overhead_pct"]) == {"grpo_guard", "grpo_guard_fused"}
        assert entry["rollout_s"]["patched"] > 0 and entry["regclip_train"]["train_step_s"] > 0
