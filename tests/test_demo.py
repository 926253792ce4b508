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
from regclip.demo.analysis import (
    at_gain,
    bootstrap,
    budget_gap,
    curve_gap,
    decide,
    interpolate,
    same_scale_gap,
    scaling_fit,
    select_scales,
    selected_gap,
)
from regclip.demo.arms import RunSpec, build_loss, kernel_for, parse_method
from regclip.demo.config import PRESET_BUDGETS, DemoConfig
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


def test_each_replicate_owns_its_generator_and_rater():
    specs = [RunSpec("flow_grpo", 1.0, 4, seed) for seed in (3, 4, 5)]
    assert len({s.generator_seed for s in specs}) == len({s.rater_seed for s in specs}) == 3


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


def test_block_checkpointing_gives_the_same_gradient():
    net = EnsembleMixer(2, 16, 4, 16, 2, torch.Generator().manual_seed(3))
    for p in net.parameters():  # non-zero output layers, so every weight gets a gradient
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    grads = []
    for flag in (False, True):
        net.checkpoint_blocks = flag
        net.zero_grad()
        net(x, t).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


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
    proxies = {0: fit_proxy(world, 0), 1: fit_proxy(world, 1)}
    bases = {"flow_grpo": 1e-3, "grpo_guard": 1e-4}
    alone = RunSpec("flow_grpo", 1.0, 2, 0)
    other = RunSpec("grpo_guard", 1.0, 2, 1)  # another replicate: its generator and rater
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


def _curve(gains, golds, iters=None, hacks=None):
    iters = iters if iters is not None else list(range(len(gains)))
    hacks = hacks if hacks is not None else [0.1 + g for g in gains]
    return [
        {"iteration": i, "proxy": 0.5 + g, "gold": gd, "hack": h}
        for i, g, gd, h in zip(iters, gains, golds, hacks, strict=True)
    ]


def test_at_gain_weights_the_later_record_by_the_fraction_of_the_step_crossed():
    # gains 0.1 -> 0.4 between iterations 1 and 2: level 0.2 is a third of the way, not half
    hit = at_gain(_curve([0.0, 0.1, 0.4], [0.4, 0.5, 0.2], hacks=[0.0, 0.3, 0.9]), 0.2)
    assert hit is not None
    assert math.isclose(hit["iteration"], 1 + 1 / 3)
    assert math.isclose(hit["gold"], 0.5 + (0.2 - 0.5) / 3)
    assert math.isclose(hit["hack"], 0.3 + (0.9 - 0.3) / 3)
    assert at_gain(_curve([0.0, 0.1], [0.4, 0.5]), 0.2) is None
    assert at_gain(_curve([0.0, 0.1], [0.4, 0.5]), 0.0) is None


def test_interpolate_reads_between_points_and_never_extrapolates():
    points = [(1.0, 0.2, 0.0), (2.0, 0.5, 1.0), (4.0, 0.1, 0.0)]
    assert math.isclose(interpolate(points, 1.25), 0.2 + 0.25 * 0.3)
    assert math.isclose(interpolate(points, 3.0), 0.5 - 0.5 * 0.4)
    assert math.isclose(interpolate(points, 1.5, column=2), 0.5)
    assert math.isnan(interpolate(points, 0.99)) and math.isnan(interpolate(points, 4.01))
    assert math.isclose(interpolate([(1.0, 0.2), (1.0, 0.4)], 1.0), 0.3)  # one speed: averaged


LEVEL = 0.25


def _arm_runs(method, seed, settings, gold_at, hack_at=None, slow=1):
    """Runs whose proxy gain rises linearly from iteration 0 (in exact binary steps); setting
    k reaches gain ``LEVEL`` after ``2 * slow * 2**k`` iterations, with gold
    ``gold_at(seed, k)`` and hack ``hack_at(seed, k)`` throughout."""
    hack_at = hack_at or (lambda seed, k: 0.0)
    runs = []
    for k, scale in enumerate(settings):
        step = 0.125 / (slow * 2**k)
        n = int(2 * LEVEL / step) + 1
        gains = [step * i for i in range(n)]
        golds = [gold_at(seed, k)] * n
        hacks = [hack_at(seed, k)] * n
        runs.append(
            {
                "method": method,
                "clip_scale": scale,
                "setting": "none" if scale is None else f"{scale:g}",
                "passes": 4,
                "lr": 1e-4,
                "seed": seed,
                "sde": "flow",
                "size": 8,
                "curve": _curve(gains, golds, hacks=hacks),
            }
        )
    return runs


SETTINGS = (0.25, 1.0, 4.0)


def _two_methods(seeds, effect=lambda seed: 0.05, hack_effect=lambda seed: -0.02):
    runs = []
    for seed in seeds:
        runs += _arm_runs("A", seed, SETTINGS, lambda s, k: 0.3 - 0.01 * k + 0.001 * s)
        runs += _arm_runs(
            "B",
            seed,
            SETTINGS,
            lambda s, k: 0.3 - 0.01 * k + 0.001 * s + effect(s),
            hack_at=lambda s, k: hack_effect(s),
        )
    return runs


def test_curve_gap_recovers_a_planted_gap_with_the_right_signs():
    runs = _two_methods(range(6))
    gold = curve_gap(runs, "B", "A", LEVEL, [k / 4 for k in range(16)])
    hack = curve_gap(runs, "B", "A", LEVEL, [k / 4 for k in range(16)], column=2)
    assert gold is not None and hack is not None
    assert math.isclose(gold["summary"]["mean"], 0.05, abs_tol=1e-12)
    assert math.isclose(hack["summary"]["mean"], -0.02, abs_tol=1e-12)  # B hacks less
    flipped = curve_gap(runs, "A", "B", LEVEL, [k / 4 for k in range(16)])
    assert flipped is not None and math.isclose(flipped["summary"]["mean"], -0.05, abs_tol=1e-12)
    assert gold["replicates"] == 6
    assert all(math.isclose(c["mean"], 0.05, abs_tol=1e-12) for c in gold["by_speed"])


def test_curve_gap_compares_only_where_both_curves_exist():
    # B is 4x slower: its settings reach the level at 8, 16, 32 iterations against A's 2, 4, 8
    runs = []
    for seed in range(3):
        runs += _arm_runs("A", seed, SETTINGS, lambda s, k: 0.3)
        runs += _arm_runs("B", seed, SETTINGS, lambda s, k: 0.4, slow=4)
    gap = curve_gap(runs, "B", "A", LEVEL, [k / 4 for k in range(29)])
    assert gap is not None
    speeds = [c["log2_iterations"] for c in gap["by_speed"]]
    assert speeds == [3.0]  # the one shared speed: 8 iterations; nothing extrapolated


def test_intervals_resample_replicates_not_runs():
    runs = _two_methods(range(5), effect=lambda seed: 0.01 * seed)
    grid = [k / 4 for k in range(16)]
    once = curve_gap(runs, "B", "A", LEVEL, grid)
    twice = curve_gap(runs + runs, "B", "A", LEVEL, grid)  # every run duplicated
    assert once is not None and twice is not None
    assert once["summary"] == twice["summary"]  # duplicate runs are not new replicates
    assert once["summary"]["n"] == 5


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.floats(-1, 1), min_size=2, max_size=12), seed=st.integers(0, 99))
def test_bootstrap_interval_brackets_the_estimate(values, seed):
    stat = bootstrap(dict(enumerate(values)), resamples=300, seed=seed)
    assert stat["lo"] - 1e-12 <= stat["mean"] <= stat["hi"] + 1e-12
    assert stat["n"] == len(values)


def test_bootstrap_intervals_narrow_as_replicates_grow():
    gen = torch.Generator().manual_seed(0)
    draws = torch.randn(256, generator=gen, dtype=torch.float64).tolist()
    widths = []
    for n in (4, 16, 64, 256):
        stat = bootstrap(dict(enumerate(draws[:n])), resamples=2000)
        widths.append(stat["hi"] - stat["lo"])
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < 0.5 * widths[1]  # about 1/sqrt(n)


def test_selection_picks_the_best_mean_gold_and_the_selected_gap_has_the_right_signs():
    runs = []
    for seed in range(4):  # A's best setting is the middle one, B's the slowest
        runs += _arm_runs("A", seed, SETTINGS, lambda s, k: (0.3, 0.4, 0.35)[k])
        runs += _arm_runs(
            "B", seed, SETTINGS, lambda s, k: (0.3, 0.4, 0.5)[k], hack_at=lambda s, k: -0.1
        )
    scales = select_scales(runs, LEVEL)
    assert scales == {"A": "1", "B": "4"}
    gap = selected_gap(runs, "B", "A", scales, LEVEL)
    assert gap is not None
    assert math.isclose(gap["gold"]["mean"], 0.1, abs_tol=1e-12)
    assert math.isclose(gap["hack"]["mean"], -0.1, abs_tol=1e-12)  # B hacks less
    # B at x4 (k = 2) reaches the level after 8 iterations, A at x1 (k = 1) after 4
    assert math.isclose(gap["log2_iter_ratio"]["mean"], 1.0, abs_tol=1e-9)


def test_budget_gap_keeps_the_checkpoint_the_proxy_prefers():
    def run(method, seed, gains, golds, hacks, scale=1.0):
        return {"method": method, "clip_scale": scale, "seed": seed, "passes": 4,
                "curve": _curve(gains, golds, hacks=hacks)}  # fmt: skip

    runs = []
    for seed in range(3):
        # vanilla's proxy peaks at iteration 2, where its gold has collapsed
        runs.append(run("A", seed, [0, 0.2, 0.5, 0.4], [0.3, 0.35, 0.1, 0.2], [0, 0.1, 0.5, 0.4]))
        runs.append(run("B", seed, [0, 0.2, 0.3, 0.45], [0.3, 0.4, 0.45, 0.3], [0, 0, 0.1, 0.2]))
    within3 = budget_gap(runs, "B", "A", budget=3)
    within2 = budget_gap(runs, "B", "A", budget=2)
    assert within3 is not None and within2 is not None
    assert math.isclose(within3["gold"]["mean"], 0.3 - 0.1, abs_tol=1e-12)  # B at it. 3
    assert math.isclose(within3["hack"]["mean"], 0.2 - 0.5, abs_tol=1e-12)
    assert math.isclose(within2["gold"]["mean"], 0.45 - 0.1, abs_tol=1e-12)  # B at it. 2
    at_one = budget_gap(runs, "B", "A", budget=3, scale="1")
    assert at_one is not None and math.isclose(at_one["gold"]["mean"], 0.2, abs_tol=1e-12)
    assert budget_gap(runs, "B", "A", budget=3, scale="4") is None


def test_same_scale_gap_pairs_by_multiple_and_signs_gold_and_hack():
    runs = []
    for seed in range(3):
        runs += _arm_runs("A", seed, SETTINGS, lambda s, k: 0.3, hack_at=lambda s, k: 0.2)
        runs += _arm_runs(
            "B", seed, SETTINGS[:2], lambda s, k: 0.2 + 0.1 * k, hack_at=lambda s, k: 0.3
        )
    gap = same_scale_gap(runs, "B", "A")
    assert gap is not None
    assert math.isclose(gap["gold"]["mean"], (-0.1 + 0.0) / 2, abs_tol=1e-12)
    assert math.isclose(gap["hack"]["mean"], 0.1, abs_tol=1e-12)  # B hacks more: positive
    assert set(gap["by_scale"]) == {"0.25", "1"}
    assert math.isclose(gap["by_scale"]["0.25"]["gold"]["mean"], -0.1, abs_tol=1e-12)


def test_decide_sets_levels_per_size_and_selects_on_the_runs_it_is_given():
    runs = []
    for seed in range(3):
        runs += _arm_runs("A", seed, SETTINGS, lambda s, k: (0.3, 0.4, 0.35)[k])
        runs += _arm_runs("B", seed, SETTINGS, lambda s, k: (0.5, 0.4, 0.3)[k])
    decisions = decide(runs, fractions=(0.5,))
    # every run's final gain is 2 * LEVEL (its curve runs to twice the level)
    assert decisions["levels"] == {"8": [LEVEL]}
    assert decisions["selected"] == {"flow/8/4/0.0001": {"A": "1", "B": "0.25"}}


def test_scaling_fit_recovers_a_planted_line_and_predicts_on_it():
    gaps = {d: {(d, r): 0.01 + 0.02 * math.log2(d) + 0.001 * (r - 1.5) for r in range(4)}
            for d in (1024, 4096, 16384)}  # fmt: skip
    fit = scaling_fit(gaps, 65536, resamples=500)
    assert math.isclose(fit["slope"]["mean"], 0.02, abs_tol=1e-12)
    assert math.isclose(fit["prediction"]["mean"], 0.01 + 0.02 * 16, abs_tol=1e-12)
    assert fit["prediction"]["lo"] <= fit["prediction"]["mean"] <= fit["prediction"]["hi"]
    with pytest.raises(ValueError, match="two latent sizes"):
        scaling_fit({1024: {0: 0.1}}, 65536)


# --- end to end and the CLI --------------------------------------------------------------


def test_tiny_experiment_writes_the_documented_schema(tmp_path):
    cfg = dataclasses.replace(
        TINY, methods=("flow_grpo", "adaptive_guard", "kl_mask", "flow_grpo_kl"), seeds=(0, 1),
        passes=(3,), kl_coefs=(0.02, 0.1), phase="confirmation",
    )  # fmt: skip
    result = run_experiment(cfg, tmp_path, log=lambda _: None)
    on_disk = json.loads((tmp_path / "frontier.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(on_disk["runs"]))
    assert "device" in on_disk
    # flow_grpo at one clip scale, adaptive_guard at one target, kl_mask at its three bounds,
    # flow_grpo_kl at two coefficients; 2 replicates
    per_seed = 1 + 1 + len(TINY.kl_bounds) + 2
    assert len(on_disk["runs"]) == len(result["runs"]) == 2 * per_seed
    for run in on_disk["runs"]:
        assert {"method", "clip_range", "seed", "generator_seed", "rater_seed", "phase", "setting",
                "passes", "curve", "pretrain_hash", "optimizer_steps"} <= set(run)  # fmt: skip
        assert run["phase"] == "confirmation"
        assert run["pretrain_hash"] == on_disk["pretrained"][str(run["generator_seed"])]
        assert [c["iteration"] for c in run["curve"]] == list(range(TINY.iterations + 1))
        assert run["optimizer_steps"] == TINY.iterations * 3  # every pass of every rollout
        assert all({"proxy", "gold", "hack"} <= set(c) for c in run["curve"])
        assert all(math.isfinite(c["gold"]) for c in run["curve"])
    by_seed = {r["seed"]: (r["generator_seed"], r["rater_seed"]) for r in on_disk["runs"]}
    assert len({g for g, _ in by_seed.values()}) == len({r for _, r in by_seed.values()}) == 2
    assert {r["setting"] for r in on_disk["runs"] if r["method"] == "flow_grpo_kl"} == {
        "kl 0.02",
        "kl 0.1",
    }
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


# --- the committed results meet the schema ---------------------------------------------


def check_committed(result: dict) -> list[dict]:
    """The checks every committed ``frontier.json`` passes; returns its runs."""
    runs = result["runs"]
    assert result["device"] and runs
    for run in runs:
        assert run["phase"] in ("exploration", "confirmation")
        assert run["generator_seed"] == run["seed"] and run["rater_seed"] == run["seed"]
        iterations = [c["iteration"] for c in run["curve"]]
        assert iterations == list(range(len(iterations)))  # evaluated at every iteration
        assert run["optimizer_steps"] == iterations[-1] * run["passes"]
    for phase in {r["phase"] for r in runs}:
        mine = [r for r in runs if r["phase"] == phase]
        per_seed = {(r["size"], r["seed"]): r["pretrain_hash"] for r in mine}
        for size in {r["size"] for r in mine}:  # a generator per replicate, none shared
            hashes = [h for (s, _), h in per_seed.items() if s == size]
            assert len(set(hashes)) == len(hashes)
    return runs


def test_committed_cpu_demo_meets_the_schema():
    result = json.loads((ROOT / "docs/results/demo_cpu/frontier.json").read_text())
    runs = check_committed(result)
    assert len({r["seed"] for r in runs}) == 3
    vanilla = [r for r in runs if r["method"] == "flow_grpo"]
    assert sum(r["curve"][-1]["gold"] < r["curve"][0]["gold"] for r in vanilla) >= 6


def test_committed_cpu_confirmation_meets_the_schema_and_the_plan():
    result = json.loads((ROOT / "docs/results/confirm_cpu/frontier.json").read_text())
    runs = check_committed(result)
    phases = {r["phase"] for r in runs}
    assert phases == {"exploration", "confirmation"}
    confirmed = [r for r in runs if r["phase"] == "confirmation"]
    explored = [r for r in runs if r["phase"] == "exploration"]
    assert {r["seed"] for r in confirmed} == set(range(200, 208))  # 8 replicates
    assert not {r["seed"] for r in confirmed} & {r["seed"] for r in explored}
    assert result["decisions"] == decide(explored)  # the rule, applied to exploration only
    for size in (16, 24, 32):  # every clip setting of the grid at every latent size
        mine = [r for r in confirmed if r["size"] == size and r["passes"] == 4]
        for method in ("flow_grpo", "grpo_guard"):
            settings = {r["setting"] for r in mine if r["method"] == method}
            assert len(settings) >= 6 and "none" in settings and "0.0625" in settings


def _load_frontier_driver():
    """``benchmarks/frontier_gpu.py`` as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = ROOT / "benchmarks" / "frontier_gpu.py"
    spec = importlib.util.spec_from_file_location("frontier_gpu", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec(run: dict) -> tuple:
    return (run["phase"], run["size"], run["method"], run["clip_scale"], run["option"],
            run["passes"], run["seed"], round(run["lr"], 9))  # fmt: skip


def test_committed_gpu_confirmation_is_the_amended_plan_run_once():
    """docs/results/confirm: exactly the runs of Amendment 1 (no more, none missing), every
    run to its last iteration, the decisions the rule gives on the exploration runs alone."""
    driver = _load_frontier_driver()
    result = json.loads((ROOT / "docs/results/confirm/frontier.json").read_text())
    runs = check_committed(result)
    assert "H100" in result["device"] or "H200" in result["device"]
    planned = []
    for phase, shards in (("exploration", driver.amended(driver.exploration_shards())),
                          ("confirmation", driver.amended(driver.confirmation_shards()))):  # fmt: skip
        for overrides, specs in shards:
            lr = overrides.get("lr", driver.PRE.lr)
            planned += [(phase, driver.SIZES[overrides.get("size", 64)]["size"], r.method,
                         r.clip_scale, r.option, r.passes, r.seed, round(lr, 9)) for r in specs]  # fmt: skip
    assert sorted(map(_spec, runs), key=repr) == sorted(planned, key=repr)
    assert all(r["curve"][-1]["iteration"] == driver.PRE.iterations for r in runs)
    explored = [r for r in runs if r["phase"] == "exploration"]
    assert result["decisions"] == decide(explored)
    confirmed = {(r["size"], r["seed"]): r["pretrain_hash"] for r in runs
                 if r["phase"] == "confirmation"}  # fmt: skip
    assert len(set(confirmed.values())) == len(confirmed) == 16  # 8 replicates x 2 sizes


@pytest.mark.parametrize("folder", ["confirm", "confirm_cpu"])
def test_committed_report_recomputes_from_its_frontier_json(folder):
    """Every number of a committed report.md is what the analysis gives on the committed runs."""
    from regclip.demo.report import markdown_report

    base = ROOT / "docs/results" / folder
    result = json.loads((base / "frontier.json").read_text())
    assert markdown_report(result) == (base / "report.md").read_text()


INTERVAL = r"([+−-]\d\.\d+) \[([+−-]\d\.\d+), ([+−-]\d\.\d+)\]"


def _intervals(text: str) -> set[tuple[str, ...]]:
    import re

    return {tuple(v.replace("−", "-") for v in m) for m in re.findall(INTERVAL, text)}


def test_every_interval_the_readme_and_results_pages_quote_is_in_a_committed_report():
    """An estimate with its interval, quoted in README.md, docs/results.md or
    docs/clip_range.md, is copied from the report of the run it names, not typed from
    memory; README quotes the GPU confirmation only."""
    reports = "".join((ROOT / f"docs/results/{f}/report.md").read_text()
                      for f in ("confirm", "confirm_cpu"))  # fmt: skip
    known = _intervals(reports)
    readme = (ROOT / "README.md").read_text()
    pages = "".join((ROOT / f"docs/{p}.md").read_text() for p in ("results", "clip_range"))
    quoted = _intervals(readme) | _intervals(pages)
    assert len(quoted) >= 10
    assert quoted <= known, sorted(quoted - known)
    assert _intervals(readme) <= _intervals((ROOT / "docs/results/confirm/report.md").read_text())


def test_amended_plan_drops_exactly_what_amendment_1_names():
    driver = _load_frontier_driver()
    for shards in (driver.exploration_shards(), driver.confirmation_shards()):
        kept = driver.amended(shards)
        every = [(o.get("size", 64), r) for o, runs in shards for r in runs]
        left = [(o.get("size", 64), r) for o, runs in kept for r in runs]
        expected = [
            (s, r) for s, r in every if s in (32, 64) and r.sde == "flow" and r.passes != 16
        ]
        assert left == expected and all(runs for _, runs in kept)
        assert {s for s, _ in every} == {32, 64, 128}
        assert any(r.sde == "dance" for _, r in every)


def test_resume_recovers_each_workers_results_from_the_merged_file():
    """``--resume`` rebuilds the exploration workers' results from the merged file, so the
    final merge of both waves equals a merge made in one call."""
    driver = _load_frontier_driver()

    def part(size: int, seeds: list[int], phase: str) -> dict:
        runs = [{"seed": s, "phase": phase, "size": size} for s in seeds]
        return {"device": "gpu", "config": {"size": size, "lr": 1e-4}, "seconds": 1.0,
                "pretrained": {str(s): f"h{size}{s}" for s in seeds},
                "proxies": {str(s): {"disc": 0.5} for s in seeds}, "runs": runs}  # fmt: skip

    parts = [part(64, [100, 101], "exploration"), part(32, [100], "exploration"),
             part(64, [102], "exploration")]  # fmt: skip
    decisions, bases = {"levels": {"64": [0.1]}}, {64: {"flow_grpo": 1e-4}}
    explored = json.loads(json.dumps(driver._merge(parts, decisions, bases, 3.0)))
    assert [p["runs"] for p in driver._parts(explored)] == [p["runs"] for p in parts]
    confirmed = [part(64, [200, 201], "confirmation")]
    resumed = driver._merge(driver._parts(explored) + confirmed, decisions, bases, 4.0)
    assert resumed == driver._merge(parts + confirmed, decisions, bases, 4.0)
