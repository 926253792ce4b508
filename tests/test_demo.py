"""The disc-world testbed behind ``regclip demo``: the world's exact gold, the rater's known
exploit, ensemble independence, the analysis, the CLI, and the committed GPU results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regclip.demo import cli
from regclip.demo.analysis import at_gain, bootstrap_mean, paired, speed_adjusted
from regclip.demo.arms import RunSpec, build_loss, kernel_for, parse_method
from regclip.demo.config import PRESET_BUDGETS, DemoConfig, seed_sources
from regclip.demo.engine import _per_member_grad_clip, run_ensemble
from regclip.demo.experiment import run_experiment
from regclip.demo.nets import EnsembleMixer
from regclip.demo.pretrain import load_or_pretrain, weights_hash
from regclip.demo.reward import fit_proxy
from regclip.demo.rollout import time_schedule
from regclip.demo.world import DiscWorld, fit_discs, to_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dataclasses.replace(DemoConfig(), **PRESET_BUDGETS["tiny"])


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_private_cache(tmp_path_factory: pytest.TempPathFactory):
    """One thread (tiny matmuls run faster without spin-waiting on a busy 2-core runner)
    and a pretraining cache in a temp folder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGCLIP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(before)


# --- the world and its gold -------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([16, 24, 32]))
def test_fit_recovers_every_world_image_exactly(seed, size):
    world = DiscWorld(size)
    att = world.attributes(6, torch.Generator().manual_seed(seed))
    fit = fit_discs(world, world.render(**att))
    torch.testing.assert_close(fit.contrast.double(), att["a"] - att["b"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fit.background.double(), att["b"], atol=1e-5, rtol=0)
    assert float(fit.residual.max()) < 1e-4


def test_gold_moves_both_ways_and_the_hack_is_measured_directly():
    world = DiscWorld(24)
    att = world.attributes(32, torch.Generator().manual_seed(0))
    base = fit_discs(world, world.render(**att))
    brighter_bg = fit_discs(world, world.render(**dict(att, b=att["b"] + 0.1)))
    darker_bg = fit_discs(world, world.render(**dict(att, b=att["b"] * 0.5)))
    assert bool((brighter_bg.gold < base.gold - 0.09).all())  # the hack lowers the gold...
    assert bool((brighter_bg.background > base.background + 0.09).all())  # ...and shows as b
    assert bool((darker_bg.gold > base.gold).all())
    noisy = world.render(**att) + 0.05 * torch.randn(
        32, 1, 24, 24, generator=torch.Generator().manual_seed(1)
    )
    assert bool((fit_discs(world, noisy.clamp(0, 1)).gold < base.gold).all())  # off-world


def test_world_gold_starts_well_below_its_ceiling():
    world = DiscWorld(24)
    gold = fit_discs(world, world.sample(256, torch.Generator().manual_seed(0))).gold
    assert 0.5 < float(gold.mean()) < 0.75  # E[a - b] = 0.725 - 0.1; ceiling 1


# --- the rater ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_rater_ranks_world_images_by_gold_but_pays_for_the_background(seed):
    world = DiscWorld(24)
    proxy = fit_proxy(world, seed)
    images = world.sample(512, torch.Generator().manual_seed(7))
    reward, gold = proxy(to_model(images)), fit_discs(world, images).gold
    assert float(torch.corrcoef(torch.stack([reward, gold]))[0, 1]) > 0.5
    assert proxy.sensitivity["background"] > 0.1  # the known exploit
    assert proxy.sensitivity["disc"] > 0


def test_proxy_seeds_give_different_raters():
    world = DiscWorld(24)
    assert not torch.equal(fit_proxy(world, 0).weight, fit_proxy(world, 1).weight)


def test_seed_sources_cover_two_generators_and_two_raters():
    assert {seed_sources(s) for s in range(4)} == {(0, 0), (1, 0), (0, 1), (1, 1)}


# --- the ensemble ------------------------------------------------------------------------


def test_ensemble_members_equal_single_networks_and_do_not_share_gradients():
    singles = [EnsembleMixer(1, 16, 4, 16, 2, torch.Generator().manual_seed(s)) for s in (3, 4)]
    for net in singles:  # non-zero output layers, so every weight gets a gradient
        for name in ("head", "tok_out", "ch_out"):
            for p in getattr(net, name).parameters() if name != "head" else [net.head]:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(5))
    both = EnsembleMixer.from_members([n.member_state(0) for n in singles], 16, 4, 16, 2)
    x = torch.randn(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    out = both(x, t)
    for e, net in enumerate(singles):
        torch.testing.assert_close(out[e], net(x[e : e + 1], t[e : e + 1])[0], rtol=1e-5, atol=1e-6)
    out[0].sum().backward()
    for p in both.parameters():
        assert p.grad is not None and bool((p.grad[1] == 0).all())
    assert any(bool(p.grad[0].abs().sum() > 0) for p in both.parameters())


def test_per_member_grad_clip_bounds_each_member_and_keeps_small_ones():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.tensor([[3.0, 4.0, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 12.0]])
    _per_member_grad_clip([p], 1.0)
    norms = p.grad.norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor([1.0, 0.5, 1.0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(p.grad[0], torch.tensor([0.6, 0.8, 0, 0]), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def tiny_pretrained():
    return load_or_pretrain(TINY, [0, 1], torch.device("cpu"), log=lambda _: None)


def test_pretraining_is_deterministic_and_identified_by_hash(
    tiny_pretrained, tmp_path, monkeypatch
):
    monkeypatch.setenv("REGCLIP_CACHE", str(tmp_path))
    again = load_or_pretrain(TINY, [0, 1], torch.device("cpu"), log=lambda _: None)
    assert again.seconds > 0  # trained afresh, not loaded
    assert again.hashes == tiny_pretrained.hashes
    assert tiny_pretrained.hashes[0] != tiny_pretrained.hashes[1]
    assert weights_hash(again.states[0]) == tiny_pretrained.hashes[0]


def test_a_run_trains_the_same_beside_other_runs(tiny_pretrained):
    world = DiscWorld(TINY.size)
    proxies = {0: fit_proxy(world, 0)}
    bases = {"flow_grpo": 1e-3, "grpo_guard": 1e-4}
    alone = RunSpec("flow_grpo", 1.0, 2, 0)
    other = RunSpec("grpo_guard", 1.0, 2, 1)  # the other generator, the same rater
    solo = run_ensemble(
        TINY, [alone], tiny_pretrained, proxies, bases, torch.device("cpu"), lambda _: None
    )
    pair = run_ensemble(
        TINY, [other, alone], tiny_pretrained, proxies, bases, torch.device("cpu"), lambda _: None
    )
    for a, b in zip(solo[0].curve, pair[1].curve, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), k


@pytest.mark.parametrize(
    "method",
    ["flow_grpo", "grpo_guard", "velocity_guard", "adaptive_guard", "kl_mask", "grpo_guard_dance"],
)
def test_every_arm_builds_a_loss_on_its_kernel(method):
    spec = RunSpec(method, 1.0, 4, 0)
    times = time_schedule(4, 3.0)
    loss = build_loss(spec, TINY, kernel_for(spec.sde, TINY, times), times, 1e-3)
    assert loss.validate is False  # no per-call host syncs in the lockstep loop
    if parse_method(method)[0] not in ("flow_grpo",):
        assert loss.kernel is not None


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method("nope")


# --- the analysis ------------------------------------------------------------------------


def _curve(gains, golds, iters=None):
    iters = iters or list(range(0, 5 * len(gains), 5))
    return [
        {"iteration": i, "proxy": 0.5 + g, "gold": gd, "hack": 0.1 + g}
        for i, g, gd in zip(iters, gains, golds, strict=True)
    ]


def test_at_gain_interpolates_the_first_crossing():
    hit = at_gain(_curve([0.0, 0.1, 0.3, 0.2], [0.4, 0.5, 0.1, 0.0]), 0.2)
    assert hit is not None
    assert math.isclose(hit["iteration"], 7.5) and math.isclose(hit["gold"], 0.3)
    assert at_gain(_curve([0.0, 0.1], [0.4, 0.5]), 0.2) is None
    assert at_gain(_curve([0.0, 0.1], [0.4, 0.5]), 0.0) is None


def test_bootstrap_interval_brackets_the_mean():
    stat = bootstrap_mean([0.1, 0.2, 0.3, 0.25, 0.15])
    assert stat["lo"] <= stat["mean"] <= stat["hi"] and stat["lo"] > 0.1 and stat["hi"] < 0.3


def _synthetic_runs(effect: float, slope: float) -> list[dict]:
    """Two methods, 5 seeds, 3 speeds: gold at gain 0.2 = effect [method B] + slope log(it)."""
    runs = []
    for seed in range(5):
        for k, scale in enumerate((0.25, 1.0, 4.0)):
            for method, bonus in (("A", 0.0), ("B", effect)):
                it = 4.0 * (k + 1) * (1.5 if method == "B" else 1.0)
                gold = 0.3 + bonus + slope * math.log(it) + 0.001 * seed
                gains = [0.0, 0.2, 0.4]
                runs.append(
                    {
                        "method": method,
                        "clip_scale": scale,
                        "passes": 4,
                        "lr": 1e-4,
                        "seed": seed,
                        "sde": "flow",
                        "curve": _curve(gains, [0.3, gold, gold], [0, it, 2 * it]),
                    }
                )
    return runs


def test_speed_adjusted_fit_recovers_the_method_effect():
    fit = speed_adjusted(_synthetic_runs(0.05, -0.02), "A", 0.2, resamples=200)
    assert fit is not None
    assert math.isclose(fit["B"]["mean"], 0.05, abs_tol=1e-9)
    assert math.isclose(fit["log_iterations"]["mean"], -0.02, abs_tol=1e-9)
    naive = paired(_synthetic_runs(0.05, -0.02), "B", "A", 0.2)
    assert naive is not None  # the paired difference mixes in the speed difference
    assert math.isclose(naive["gold"]["mean"], 0.05 - 0.02 * math.log(1.5), abs_tol=1e-9)


# --- end to end and the CLI --------------------------------------------------------------


def test_tiny_experiment_writes_the_documented_schema(tmp_path):
    cfg = dataclasses.replace(
        TINY, methods=("flow_grpo", "adaptive_guard", "kl_mask"), seeds=(0, 1)
    )
    result = run_experiment(cfg, tmp_path, log=lambda _: None)
    on_disk = json.loads((tmp_path / "frontier.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(on_disk["runs"]))
    # flow_grpo at one clip scale, adaptive_guard once, kl_mask at its three bounds; 2 seeds
    assert len(on_disk["runs"]) == len(result["runs"]) == 2 * (1 + 1 + len(TINY.kl_bounds))
    for run in on_disk["runs"]:
        assert {
            "method",
            "clip_range",
            "seed",
            "pretrain_seed",
            "reward_seed",
            "passes",
            "curve",
            "pretrain_hash",
        } <= set(run)
        assert run["pretrain_hash"] == on_disk["pretrained"][str(run["pretrain_seed"])]
        assert [c["iteration"] for c in run["curve"]] == list(range(TINY.iterations + 1))
        assert all({"proxy", "gold", "hack"} <= set(c) for c in run["curve"])
        assert all(math.isfinite(c["gold"]) for c in run["curve"])
    assert "\n  " not in (tmp_path / "frontier.json").read_text()  # compact, one run per line


def _demo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regclip.cli", "demo", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iterations", "0"], "--iterations"),
        (["--passes", "-1"], "--passes"),
        (["--lr", "abc"], "--lr"),
        (["--methods", "nope"], "--methods"),
        (["--budget", "gpu"], "--budget gpu"),
    ],
)
def test_cli_mistakes_end_in_one_line(args, message, tmp_path):
    proc = _demo(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_cli_refuses_an_unwritable_out_and_a_missing_cuda(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _demo("--budget", "tiny", "--out", str(blocker / "sub"), cwd=tmp_path)
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr
    if not torch.cuda.is_available():
        proc = _demo(
            "--budget", "tiny", "--device", "cuda", "--out", str(tmp_path / "o"), cwd=tmp_path
        )
        assert proc.returncode == 2 and "--device cuda" in proc.stderr


def test_cli_tiny_budget_runs_end_to_end(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--budget", "tiny", "--out", str(tmp_path), "--no-plots"])
    assert cli.run(args) == 0
    assert (tmp_path / "frontier.json").exists() and (tmp_path / "report.md").exists()


# --- the committed GPU results meet the counts -----------------------------------


def test_committed_frontier_meets_the_schema_and_the_counts():
    result = json.loads((ROOT / "docs/results/frontier/frontier.json").read_text())
    assert "H200" in result["device"]
    runs = result["runs"]
    main = [r for r in runs if r["sde"] == "flow" and r["size"] == 64 and r["passes"] == 4]
    for method in ("flow_grpo", "grpo_guard", "velocity_guard", "ratio_norm", "flow_grpo_kl"):
        ranges = {r["clip_range"] for r in main if r["method"] == method}
        finite = sorted(x for x in ranges if x is not None)
        assert None in ranges and len(finite) >= 3 and finite[-1] / finite[0] >= 10, method
    assert {r["method"] for r in runs} >= {"adaptive_guard", "kl_mask", "adaptive_guard_dance"}
    assert len({r["seed"] for r in main}) >= 5
    assert (
        len({r["pretrain_seed"] for r in main}) >= 2 and len({r["reward_seed"] for r in main}) >= 2
    )
    assert {r["passes"] for r in runs} >= {1, 4, 16}
    assert {r["size"] for r in runs} >= {32, 64}
    vanilla = [r for r in main if r["method"] == "flow_grpo" and r["clip_scale"] == 1.0]
    hacked = [
        r["curve"][-1]["gold"] < r["curve"][0]["gold"]
        and r["curve"][-1]["proxy"] > r["curve"][0]["proxy"]
        for r in vanilla
    ]
    assert len(vanilla) >= 5 and sum(hacked) >= 4
