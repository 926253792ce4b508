"""``benchmarks/upstream_overhead.py``: its statistics on known inputs, and the GPU
benchmark's code path on CPU (``--tiny``) against the real upstream scripts
(``pytest -m upstream`` with ``REGCLIP_FLOW_GRPO_SRC``)."""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from _upstream import skip_on_missing_dependency, upstream_checkout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import upstream_overhead

SRC, UPSTREAM = upstream_checkout("REGCLIP_FLOW_GRPO_SRC", "flow_grpo checkout (9745241)")


def test_paired_ratio_is_the_median_ratio_inside_its_bootstrap_interval() -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(2.0, 3.0, size=25)  # drifting steps: the pairs share the drift
    pairs = [
        (float(a), float(a * r)) for a, r in zip(base, rng.normal(1.01, 0.002, 25), strict=True)
    ]
    out = upstream_overhead.paired_ratio(pairs)
    ratios = [b / a for a, b in pairs]
    assert out["pairs"] == 25 and out["median"] == pytest.approx(np.median(ratios), abs=1e-4)
    lo, hi = out["ci95"]
    assert lo <= out["median"] <= hi and min(ratios) <= lo and hi <= max(ratios)
    assert lo > 1.0 and hi < 1.02  # the 1 % overhead is resolved despite +-20 % drift
    assert upstream_overhead.paired_ratio(pairs) == out  # seeded
    assert out["overhead_pct"] == pytest.approx(100 * (out["median"] - 1), abs=0.01)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_host_seconds_count_our_functions_and_the_c_calls_they_make() -> None:
    here = str(Path(__file__).resolve().parent)
    profiler = cProfile.Profile()
    profiler.enable()
    _busy(0.05)  # this file's own time (plus its perf_counter calls)
    sorted(range(10**5))  # a C call from this file
    profiler.disable()
    stats = pstats.Stats(profiler)
    ours = upstream_overhead.host_seconds_in(stats, (here,))
    assert 0.045 < ours <= stats.total_tt + 1e-9  # type: ignore[attr-defined]
    assert upstream_overhead.host_seconds_in(stats, ("/nowhere/",)) == 0.0


def _light() -> None:
    _busy(0.01)


def _heavy() -> None:
    _busy(0.03)
    sorted(range(10**5))  # a C call: counted to this function


def test_host_time_is_split_by_function_and_the_heaviest_listed_first() -> None:
    here = str(Path(__file__).resolve().parent)
    profiler = cProfile.Profile()
    profiler.enable()
    _light()
    _heavy()
    profiler.disable()
    stats = pstats.Stats(profiler)
    by_function = upstream_overhead.host_seconds_by_function(stats, (here,))
    assert sum(by_function.values()) == upstream_overhead.host_seconds_in(stats, (here,))
    heaviest = upstream_overhead.heaviest_functions(stats, (here,), count=2)
    names = list(heaviest)
    assert len(names) == 2 and names[0].endswith(" _busy") and names[1].endswith(" _heavy")
    assert names[1].startswith("tests/test_upstream_overhead.py:")  # relative to the repo
    assert heaviest[names[0]] >= 40 and heaviest[names[1]] > 0  # ms; _busy's own 0.04 s
    sort = [v for (_, _, n), v in stats.stats.items() if "sorted" in n]  # type: ignore[attr-defined]
    heavy_own = [v for (_, _, n), v in stats.stats.items() if n == "_heavy"]  # type: ignore[attr-defined]
    assert heaviest[names[1]] == pytest.approx(1000 * (heavy_own[0][2] + sort[0][2]), abs=1e-3)


def test_read_wait_counts_only_device_reads_made_from_our_code() -> None:
    here = str(Path(__file__).resolve().parent)
    values = np.zeros(2 * 10**6)

    def step() -> None:  # entered while profiling, so its C calls have a caller here
        _busy(0.03)  # our own time: not a read
        sorted(range(10**5))  # a C call, not a read
        values.tolist()  # a read

    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    reads = upstream_overhead.host_seconds_in(stats, (here,), upstream_overhead.DEVICE_READS)
    everything = upstream_overhead.host_seconds_in(stats, (here,))
    assert 0 < reads < everything - 0.03
    (tolist,) = [v for (_, _, n), v in stats.stats.items() if "'tolist'" in n]  # type: ignore[attr-defined]
    assert reads == pytest.approx(tolist[3])


@UPSTREAM[0]
@UPSTREAM[1]
def test_sd3_and_flux_overhead_benchmark_tiny_dry_run(tmp_path: Path) -> None:
    assert SRC is not None
    if not (Path(SRC) / "scripts" / "train_flux.py").is_file():
        pytest.skip("the benchmark drives train_flux.py: it needs Flow-GRPO 9745241")
    out = tmp_path / "overhead.json"
    with skip_on_missing_dependency(SRC):
        code = upstream_overhead.main(
            ["--tiny", "--device", "cpu", "--repeats", "1", "--pairs", "3", "--src", SRC,
             "--out", str(out)]
        )  # fmt: skip
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
        paired = entry["paired_ratio"]
        assert paired["pairs"] == 3 and paired["ci95"][0] <= paired["median"] <= paired["ci95"][1]
        attribution = entry["attribution"]
        assert 0 < attribution["regclip_host_s"] < attribution["profiled_step_s"]
        assert 0 < attribution["regclip_host_pct"] < 100
        assert 0 < attribution["patch_wall_s"] < attribution["profiled_step_s"]
        assert attribution["heaviest_ms"] and all(
            where.startswith(("src/regclip/", "integrations/"))
            for where in attribution["heaviest_ms"]
        )
        assert set(attribution["loss_backward_s"]) == {"upstream", "grpo_guard_fused"}
        assert all(0 < s < attribution["profiled_step_s"]
                   for s in attribution["loss_backward_s"].values())  # fmt: skip


def _work() -> int:
    _busy(0.04)
    return 1


_UPSTREAM = ModuleType("upstream_stand_in")  # an upstream module ...
_UPSTREAM.work = _work  # type: ignore[attr-defined]


class _Patch:
    """... and the patch, calling it back."""

    def outer(self) -> int:
        _busy(0.02)
        return self.inner() + _UPSTREAM.work()  # ours nested in ours, and a call back

    def inner(self) -> int:
        _busy(0.01)
        return 1


def test_patch_clock_times_our_outermost_calls_less_upstream_calls_back() -> None:
    upstream, patch = _work, (vars(_Patch)["outer"], vars(_Patch)["inner"])
    syncs: list[float] = []
    clock = upstream_overhead.PatchClock(
        ours=[(_Patch, "outer"), (_Patch, "inner")],
        theirs=[(_UPSTREAM, "work")],
        sync=lambda: syncs.append(clock.seconds) or _busy(0.05),  # untimed, or over 0.046
    )
    with clock:
        assert _Patch.inner.__name__ == "inner"  # wrapped, signature and name kept
        assert _Patch().outer() == 2
        _UPSTREAM.work()  # upstream's own call outside the patch: not subtracted
        _Patch().inner()
    assert 0.04 <= clock.seconds < 0.046  # 0.02 + 0.01 (nested: once) + 0.01, less 0.04
    assert len(syncs) == 2 and syncs[0] == 0.0  # before each outermost call, untimed
    assert _UPSTREAM.work is upstream  # restored on exit
    assert (vars(_Patch)["outer"], vars(_Patch)["inner"]) == patch
    _Patch().outer()
    assert clock.seconds < 0.046  # not counted once exited


class _Descriptors:
    @classmethod
    def made(cls) -> int:
        return 1

    def plain(self) -> int:
        return 1


def test_patch_clock_refuses_what_it_cannot_wrap_and_patches_nothing() -> None:
    plain = vars(_Descriptors)["plain"]
    clock = upstream_overhead.PatchClock(
        ours=[(_Descriptors, "plain"), (_Descriptors, "made")], theirs=[]
    )
    with pytest.raises(TypeError, match=r"_Descriptors\.made is classmethod"):
        clock.__enter__()
    assert vars(_Descriptors)["plain"] is plain and clock.seconds == 0.0


class _Busy(torch.autograd.Function):
    """Identity whose backward spends ``seconds``."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds  # type: ignore[attr-defined]
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        _busy(ctx.seconds)  # type: ignore[attr-defined]
        return grad, None


class _Accelerator:
    def backward(self, loss: torch.Tensor) -> None:
        _busy(0.015)  # the library's own work before autograd starts: not the loss's
        (loss / 2).backward()


class _PatchedAccelerator(_Accelerator):  # as the adapter's subclass calls it
    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss * 1)


def _compute_log_prob(x: torch.Tensor) -> tuple[None, None, torch.Tensor]:
    return None, None, _Busy.apply(x, 0.03)  # the mean; its own backward is the model's


_SCRIPT = ModuleType("script_stand_in")
_SCRIPT.compute_log_prob = _compute_log_prob  # type: ignore[attr-defined]


def test_loss_backward_clock_times_from_the_loss_to_the_mean_only() -> None:
    original = (vars(_Accelerator)["backward"], _compute_log_prob)
    syncs: list[float] = []

    def sync() -> None:  # untimed, or the first span would be over 0.05
        syncs.append(clock.seconds)
        _busy(0.05)

    clock = upstream_overhead.LossBackwardClock(_Accelerator, _SCRIPT, sync=sync)
    x = torch.ones(3, requires_grad=True)
    with clock:
        for accelerator in (_Accelerator(), _PatchedAccelerator()):
            mean = _SCRIPT.compute_log_prob(x)[2]
            accelerator.backward(_Busy.apply(mean, 0.02).sum())  # the loss's backward: 0.02
        # each span 0.02: not the library's work before it (0.015), the mean's own backward
        # (0.03) or the sync (0.05); both spans counted
        assert 0.04 <= clock.seconds < 0.05 and clock.spans == clock.calls == 2
        with torch.no_grad():
            _SCRIPT.compute_log_prob(x)  # no graph: nothing hooked
        _Accelerator().backward(_Busy.apply(x, 0.02).sum())  # never reaches a hooked mean
        assert 0.04 <= clock.seconds < 0.05 and (clock.spans, clock.calls) == (2, 3)
    assert len(syncs) == 3 and syncs[0] == 0.0  # before each backward, untimed
    assert (vars(_Accelerator)["backward"], _SCRIPT.compute_log_prob) == original  # restored
    clock.reset()
    assert (clock.seconds, clock.spans, clock.calls) == (0.0, 0, 0)
