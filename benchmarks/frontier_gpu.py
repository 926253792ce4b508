"""The frontier experiment on one GPU: many worker processes share it, each an ensemble.

    python benchmarks/frontier_gpu.py --out OUT [--exploration-only]
    python benchmarks/frontier_gpu.py --out OUT2 --resume OUT     # the confirmation wave

The pre-registered experiment of ``docs/results/preregistration.md`` (``--plan amended``:
its Amendment 1, which ``docs/results/confirm`` ran in two calls, ``--exploration-only``
then ``--resume``):

1. Pretrains every latent size's generators in parallel processes (or loads them from
   ``$REGCLIP_CACHE``), one generator per replicate seed.
2. Calibrates every method's base clip range per latent size and kernel, once, on a probe
   rollout of the first exploration replicate.
3. Exploration wave: the shards of :func:`exploration_shards` on the exploration replicates,
   all at once as worker processes (``--worker`` mode of this script), each with its time
   limit.
4. :func:`regclip.demo.analysis.decide` turns the exploration runs into the proxy levels
   and each method's selected setting (``OUT/decisions.json``).
5. Confirmation wave: :func:`confirmation_shards` on the confirmation replicates.
6. Merges every worker's ``frontier.json`` into ``OUT/frontier.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from regclip.demo.analysis import decide
from regclip.demo.arms import RunSpec
from regclip.demo.config import CLIP_GRID, PRESET_BUDGETS, DemoConfig
from regclip.demo.engine import calibrate
from regclip.demo.experiment import dump_compact, run_experiment
from regclip.demo.pretrain import checkpoint_path, load_or_pretrain
from regclip.demo.reward import fit_proxy
from regclip.demo.world import DiscWorld

GPU = dataclasses.replace(DemoConfig(), **PRESET_BUDGETS["gpu"], device="cuda")

SIZES: dict[int, dict[str, int]] = {
    32: {"size": 32, "patch": 4},
    64: {"size": 64, "patch": 8},
    128: {"size": 128, "patch": 16},
}
"""Image side -> network: D = 1024, 4096, 16384, always 64 tokens (the patch grows with D)."""

CLIPPED = ("flow_grpo", "grpo_guard", "ratio_norm", "velocity_guard")
PAIR = ("flow_grpo", "grpo_guard")
DANCE = ("flow_grpo_dance", "grpo_guard_dance")


def _grid(methods, scales, seeds, option=None, passes=4):
    return [RunSpec(m, s, passes, seed, option) for m in methods for s in scales for seed in seeds]


def _other_arms(cfg: DemoConfig, seeds) -> list[RunSpec]:
    """adaptive_guard at its targets, flow_grpo_kl at its coefficients (at the calibrated
    clip), kl_mask over its bounds; Flow-SDE, 4 passes."""
    runs = [RunSpec("adaptive_guard", None, 4, s, t) for t in cfg.adaptive_targets for s in seeds]
    runs += [RunSpec("flow_grpo_kl", 1.0, 4, s, c) for c in cfg.kl_coefs for s in seeds]
    return runs + _grid(("kl_mask",), cfg.kl_bounds, seeds)


Shard = tuple[dict[str, Any], list[RunSpec]]
"""A worker: config overrides (``size`` selects the latent size; the rest are
:class:`DemoConfig` fields) and its runs."""

EXPLORE_SEEDS = (100, 101, 102)
"""Exploration replicates: they set the proxy levels and select each method's setting."""

CONFIRM_SEEDS = tuple(range(200, 208))
"""Confirmation replicates: run once, after the pre-registration was committed."""

PRE = dataclasses.replace(
    GPU,
    group_size=8,
    iterations=40,
    lr=1e-4,
    eval_samples=48,
    clip_scales=CLIP_GRID,
    kl_bounds=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 4.0),
    kl_coefs=(0.02, 0.1),
    adaptive_targets=(0.05, 0.15, 0.3),
)
"""The pre-registered configuration: D = 4096 (image side 64) unless a shard says otherwise,
2 groups of 8 per rollout, lr 1e-4, at most 40 iterations, evaluation every iteration."""

ONE_PASS_LRS = (1.0, 4.0)
"""Learning-rate multiples of the one-pass runs: with one pass the ratio is 1 and clipping
never acts, so the learning rate is the knob that sets their speed."""


def exploration_shards(seeds: tuple[int, ...] = EXPLORE_SEEDS) -> list[Shard]:
    """Every arm at D = 4096 (Flow-SDE, 4 passes); vanilla and GRPO-Guard over the clip grid
    on Dance-SDE and at D = 1024 and 16384."""
    return [
        ({"size": 64}, _grid(CLIPPED, CLIP_GRID, seeds)),
        ({"size": 64}, _other_arms(PRE, seeds) + _grid(DANCE, CLIP_GRID, seeds)),
        ({"size": 32}, _grid(PAIR, CLIP_GRID, seeds)),
        ({"size": 128}, _grid(PAIR, CLIP_GRID, seeds)),
    ]


def confirmation_shards(seeds: tuple[int, ...] = CONFIRM_SEEDS) -> list[Shard]:
    """The confirmation: every arm at D = 4096; 1 and 16 passes; Dance-SDE; vanilla and
    GRPO-Guard over the clip grid at D = 1024 and 16384."""
    half = len(seeds) // 2
    return [
        ({"size": 64}, _grid(PAIR, CLIP_GRID, seeds)),
        ({"size": 64}, _grid(CLIPPED[2:], CLIP_GRID, seeds)),
        ({"size": 64}, _other_arms(PRE, seeds)),
        ({"size": 64}, _grid(DANCE, CLIP_GRID, seeds)),
        ({"size": 64}, _grid(PAIR, (1 / 16, 1 / 4, 1.0, None), seeds[:half], passes=16)),
        ({"size": 64}, _grid(PAIR, (1 / 16, 1 / 4, 1.0, None), seeds[half:], passes=16)),
        *[
            ({"size": 64, "lr": PRE.lr * m}, _grid(PAIR, (1.0,), seeds, passes=1))
            for m in ONE_PASS_LRS
        ],
        ({"size": 32}, _grid(PAIR, CLIP_GRID, seeds)),
        ({"size": 128}, _grid(PAIR, CLIP_GRID, seeds[:half])),
        ({"size": 128}, _grid(PAIR, CLIP_GRID, seeds[half:])),
    ]


AMENDED_SIZES = (32, 64)
"""Amendment 1 (``--plan amended``): D = 1024 and 4096 only."""


def amended(shards: list[Shard]) -> list[Shard]:
    """Amendment 1 of ``docs/results/preregistration.md``: the registered shards without
    D = 16384, Dance-SDE and 16 passes (what one device call can hold); every other run as
    registered."""
    kept = []
    for overrides, runs in shards:
        if overrides.get("size", 64) not in AMENDED_SIZES:
            continue
        runs = [r for r in runs if r.sde == "flow" and r.passes != 16]
        if runs:
            kept.append((overrides, runs))
    return kept


CPU_SIZES: dict[int, dict[str, int]] = {
    32: {"size": 16, "patch": 4},
    64: {"size": 24, "patch": 4},
    128: {"size": 32, "patch": 4},
}
"""``--budget cpu``: the same plan at D = 256, 576 and 1024 on the CPU default's network."""

CPU_SCALE: dict[str, Any] = dict(
    width=48, depth=2, pretrain_steps=1500, pretrain_batch=128, num_steps=8, lr=3e-4,
    iterations=30, eval_samples=32, checkpoint_blocks=False, device="cpu",
)  # fmt: skip
"""``--budget cpu``: the CPU default's network, pretraining, schedule and learning rate."""

TINY_SIZES: dict[int, dict[str, int]] = {label: {"size": 16, "patch": 4} for label in SIZES}
"""``--budget tiny``: every latent size on the tiny network (a check of this script)."""


def cpu_exploration_shards(seeds: tuple[int, ...] = EXPLORE_SEEDS) -> list[Shard]:
    """``--budget cpu``: vanilla and GRPO-Guard over the clip grid at every latent size."""
    return [({"size": size}, _grid(PAIR, CLIP_GRID, seeds)) for size in (32, 64, 128)]


def cpu_confirmation_shards(seeds: tuple[int, ...] = CONFIRM_SEEDS) -> list[Shard]:
    """``--budget cpu``: what two cores can run in about half an hour: vanilla and
    GRPO-Guard over the clip grid at every latent size, the other clipped methods and
    arms at the middle size, and one pass at two learning rates (no 16 passes, no
    Dance-SDE)."""
    half = len(seeds) // 2
    return [
        *[({"size": size}, _grid(PAIR, CLIP_GRID, seeds)) for size in (32, 64)],
        ({"size": 128}, _grid(PAIR, CLIP_GRID, seeds[:half])),
        ({"size": 128}, _grid(PAIR, CLIP_GRID, seeds[half:])),
        ({"size": 64}, _grid(CLIPPED[2:], CLIP_GRID, seeds)),
        ({"size": 64}, _other_arms(PRE, seeds)),
        *[
            ({"size": 64, "lr": CPU_SCALE["lr"] * m}, _grid(PAIR, (1.0,), seeds, passes=1))
            for m in ONE_PASS_LRS
        ],
    ]


def _config(
    base: DemoConfig, overrides: dict[str, Any], table: dict[int, dict[str, int]]
) -> DemoConfig:
    """``base`` with a shard's overrides; ``size`` is a label of ``table`` (the GPU plan's
    image side: :data:`SIZES`, :data:`CPU_SIZES` or :data:`TINY_SIZES`), mapped to the
    scale's image side and patch."""
    size = overrides.get("size", 64)
    fields = {k: v for k, v in overrides.items() if k != "size"}
    return dataclasses.replace(base, **table[size], **fields)


def _worker(job_path: Path, out: Path) -> int:
    job = json.loads(job_path.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()}
    cfg = DemoConfig(**fields)
    runs = [RunSpec(**r) for r in job["runs"]]
    log = lambda m: print(f"[{out.name}] {m}", flush=True)  # noqa: E731
    if job.get("pretrain_only"):
        pre = load_or_pretrain(cfg, job["seeds"], torch.device(cfg.device), log)
        log(f"pretrained {len(pre.hashes)} generators in {pre.seconds:.0f} s")
        return 0
    run_experiment(cfg, out, runs, bases=job["bases"], keep_images=8, log=log)
    return 0


def _spawn(job: dict[str, Any], out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "job.json"
    path.write_text(json.dumps(job))
    return subprocess.Popen([sys.executable, __file__, "--out", str(out), "--worker", str(path)])


def shared_config(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The config fields every worker ran with (each shard's own are under ``shards``)."""
    configs = [p["config"] for p in results]
    if not configs:
        return {}
    return {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}


def _run_wave(
    cfg: DemoConfig,
    shards: list[Shard],
    bases: dict[int, dict[str, float]],
    out: Path,
    tag: str,
    levels: dict[str, list[float]],
    table: dict[int, dict[str, int]],
) -> tuple[list[int], list[dict[str, Any]]]:
    """Run ``shards`` at once as worker processes; their exit codes and results."""
    procs, parts = [], []
    for index, (overrides, runs) in enumerate(shards):
        scfg = _config(cfg, overrides, table)
        scfg = dataclasses.replace(scfg, levels=tuple(levels.get(str(scfg.size), ())))
        part = out / f"{tag}{index}"
        job = {"config": scfg.to_json(), "bases": bases[overrides.get("size", 64)],
               "runs": [dataclasses.asdict(r) for r in runs]}  # fmt: skip
        procs.append(_spawn(job, part))
        parts.append(part)
    codes = [p.wait() for p in procs]
    results = [json.loads((p / "frontier.json").read_text()) for p in parts
               if (p / "frontier.json").exists()]  # fmt: skip
    return codes, results


def _time_limit(wanted: float, start: float, deadline: float | None) -> float:
    """A wave's per-worker time limit: ``wanted``, shortened so that the wave ends about
    45 s (evaluation, merge, packing) before ``deadline`` seconds after ``start``."""
    if deadline is None:
        return wanted
    left = deadline - (time.perf_counter() - start) - 45.0
    return max(10.0, min(wanted, left))


def _calibrate_bases(
    cfg: DemoConfig, table: dict[int, dict[str, int]], explore: list[Shard], shards: list[Shard]
) -> dict[int, dict[str, float]]:
    """Each size's clip ranges from its first exploration replicate's probe rollout."""
    bases: dict[int, dict[str, float]] = {}
    for s in sorted({o.get("size", 64) for o, _ in shards}):
        scfg = _config(cfg, {"size": s}, table)
        device = torch.device(scfg.device)
        probe = min(r.seed for o, runs in explore if o.get("size", 64) == s for r in runs)
        pre = load_or_pretrain(scfg, [probe], device)
        methods = sorted({r.method for o, runs in shards if o.get("size", 64) == s for r in runs})
        proxies = {probe: fit_proxy(DiscWorld(scfg.size), probe)}
        bases[s] = calibrate(scfg, methods, pre, proxies, device)
    return bases


def _parts(merged: dict[str, Any]) -> list[dict[str, Any]]:
    """Undo :func:`_merge`: the per-worker results of a merged ``frontier.json``."""
    parts, first = [], 0
    for shard in merged["shards"]:
        prefix = f"size{shard['config']['size']}/"

        def own(table: dict[str, Any], prefix: str = prefix) -> dict[str, Any]:
            return {k.removeprefix(prefix): v for k, v in table.items() if k.startswith(prefix)}

        parts.append({
            "device": merged["device"], "config": shard["config"], "seconds": shard["seconds"],
            "pretrained": own(merged["pretrained"]), "proxies": own(merged["proxies"]),
            "runs": merged["runs"][first : first + shard["runs"]],
        })  # fmt: skip
        first += shard["runs"]
    return parts


def _merge(
    results: list[dict[str, Any]],
    decisions: dict[str, Any],
    bases: dict[int, dict[str, float]],
    seconds: float,
) -> dict[str, Any]:
    """One ``frontier.json`` of every worker's results (:func:`_parts` undoes it)."""
    return {
        "device": results[0]["device"] if results else "?",
        "seconds": seconds,
        "config": shared_config(results),
        "decisions": decisions,
        "shards": [
            {
                "phase": p["runs"][0]["phase"] if p["runs"] else "?",
                "config": p["config"],
                "seconds": p["seconds"],
                "runs": len(p["runs"]),
            }
            for p in results
        ],
        "pretrained": {
            f"size{p['config']['size']}/{k}": h for p in results for k, h in p["pretrained"].items()
        },
        "proxies": {
            f"size{p['config']['size']}/{k}": v for p in results for k, v in p["proxies"].items()
        },
        "bases": {f"size{s}": b for s, b in bases.items()},
        "runs": [r for p in results for r in p["runs"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", type=Path, help="(internal) a worker's job file")
    parser.add_argument(
        "--budget",
        choices=sorted(PRESET_BUDGETS),
        default="gpu",
        help="gpu: the plan as registered; cpu: its core at CPU scale (D = 256, 576, 1024); "
        "tiny: a check of this script",
    )
    parser.add_argument(
        "--plan", choices=["registered", "amended"], default="registered",
        help="amended: Amendment 1 of the pre-registration (D = 1024 and 4096, no Dance-SDE, "
        "no 16 passes)",
    )  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, help="override (Amendment 1: 3000)")
    parser.add_argument("--pretrain-batch", type=int, help="override (Amendment 1: 128)")
    parser.add_argument("--explore-time", type=float, default=90.0, help="seconds per worker")
    parser.add_argument("--confirm-time", type=float, default=300.0, help="seconds per worker")
    parser.add_argument(
        "--deadline", type=float,
        help="seconds this call may take: each wave's worker time limit is shortened to end "
        "before it",
    )  # fmt: skip
    parser.add_argument(
        "--exploration-only", action="store_true", help="stop after the exploration wave"
    )
    parser.add_argument(
        "--resume", type=Path,
        help="an --exploration-only OUT: take its runs, clip ranges and decisions, and run "
        "the confirmation wave only (generators from $REGCLIP_CACHE)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker, args.out)
    if args.resume and not (args.resume / "frontier.json").is_file():
        parser.error(f"--resume: {args.resume / 'frontier.json'} not found (run with "
                     "--exploration-only first)")  # fmt: skip
    cfg = PRE
    explore, confirm = exploration_shards(), confirmation_shards()
    table = SIZES
    if args.budget == "cpu":  # the plan at CPU scale, fewer arms
        table = CPU_SIZES
        cfg = dataclasses.replace(cfg, **CPU_SCALE)
        explore, confirm = cpu_exploration_shards(), cpu_confirmation_shards()
    elif args.budget != "gpu":  # a CPU check: the tiny network, two runs a shard
        table = TINY_SIZES
        cfg = dataclasses.replace(cfg, **PRESET_BUDGETS[args.budget], device="cpu")
        explore = [(o, r[:2]) for o, r in explore]
        confirm = [(o, r[:2]) for o, r in confirm]
    if args.plan == "amended":
        explore, confirm = amended(explore), amended(confirm)
    for name in ("pretrain_steps", "pretrain_batch"):
        if getattr(args, name) is not None:
            cfg = dataclasses.replace(cfg, **{name: getattr(args, name)})
    shards = explore + confirm  # pretrained and calibrated for, even with --exploration-only
    if args.exploration_only:
        confirm = []
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    codes: list[int] = []
    if args.resume:  # the exploration wave ran in an earlier call
        earlier = json.loads((args.resume / "frontier.json").read_text())
        for overrides, runs in confirm:  # a worker must not pretrain: that is another plan
            scfg = _config(cfg, overrides, table)
            missing = sorted({r.seed for r in runs if not checkpoint_path(scfg, r.seed).exists()})
            if missing:
                parser.error(f"--resume: no cached generator for seeds {missing}: "
                             f"{checkpoint_path(scfg, missing[0])} is missing")  # fmt: skip
        decisions = earlier["decisions"]
        bases = {int(k.removeprefix("size")): b for k, b in earlier["bases"].items()}
        results = _parts(earlier)
    else:
        sizes = sorted({o.get("size", 64) for o, _ in shards})  # labels of the table
        seeds = {
            s: sorted({r.seed for o, runs in shards if o.get("size", 64) == s for r in runs})
            for s in sizes
        }
        pre_jobs = []
        for s in sizes:
            job = {"config": _config(cfg, {"size": s}, table).to_json(), "pretrain_only": True}
            pre_jobs.append(
                _spawn({**job, "seeds": seeds[s], "runs": []}, args.out / f"pretrain{s}")
            )
        codes += [p.wait() for p in pre_jobs]
        print(f"pretraining done ({time.perf_counter() - start:.0f} s), exit codes {codes}",
              flush=True)  # fmt: skip
        bases = _calibrate_bases(cfg, table, explore, shards)
        print(f"bases {bases} ({time.perf_counter() - start:.0f} s)", flush=True)
        limit = _time_limit(args.explore_time, start, None if confirm else args.deadline)
        ecfg = dataclasses.replace(cfg, phase="exploration", time_limit=limit)
        more, results = _run_wave(ecfg, explore, bases, args.out, "explore", {}, table)
        codes += more
        decisions = decide([r for p in results for r in p["runs"]])
        (args.out / "decisions.json").write_text(json.dumps(decisions, indent=1))
        print(f"exploration done ({time.perf_counter() - start:.0f} s): {decisions}", flush=True)
    if confirm:
        limit = _time_limit(args.confirm_time, start, args.deadline)
        ccfg = dataclasses.replace(cfg, phase="confirmation", time_limit=limit)
        more, confirmed = _run_wave(
            ccfg, confirm, bases, args.out, "confirm", decisions["levels"], table
        )
        codes += more
        results += confirmed
    merged = _merge(results, decisions, bases, time.perf_counter() - start)
    if args.resume:
        merged["seconds"] += earlier["seconds"]
    dump_compact(merged, args.out / "frontier.json")
    print(
        f"merged {len(merged['runs'])} runs, exit codes {codes}, {merged['seconds']:.0f} s",
        flush=True,
    )
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    sys.exit(main())
