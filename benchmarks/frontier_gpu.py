"""The frontier experiment on one GPU: many worker processes share it, each an ensemble.

    python benchmarks/frontier_gpu.py --plan explore --out OUT
    python benchmarks/frontier_gpu.py --plan confirm --out OUT

1. Pretrains every latent size's generators in parallel processes (or loads them from
   ``$REGCLIP_CACHE``), one generator per replicate seed.
2. Fits each replicate's rater and calibrates every method's base clip range per latent size
   and kernel, once (the probe rollout uses the plan's first replicate).
3. Runs the plan's shards (runs that share a kernel, passes, lr and size) as worker
   processes (``--worker`` mode of this script), all at once, each with its time limit.
4. Merges the workers' ``frontier.json`` files into ``OUT/frontier.json``.

``explore`` runs on exploration replicates and chose the learning rate, the iterations, the
proxy levels and the grids. ``confirm`` runs the pre-registered plan of
``docs/results/preregistration.md`` on the confirmation replicates, once.
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

from regclip.demo.arms import RunSpec
from regclip.demo.config import CLIP_GRID, PRESET_BUDGETS, DemoConfig
from regclip.demo.engine import calibrate
from regclip.demo.experiment import dump_compact, run_experiment
from regclip.demo.pretrain import load_or_pretrain
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


def _grid(methods, scales, seeds, option=None, passes=4):
    return [RunSpec(m, s, passes, seed, option) for m in methods for s in scales for seed in seeds]


def _other_arms(cfg: DemoConfig, seeds, suffix: str = "") -> list[RunSpec]:
    """adaptive_guard at its targets, flow_grpo_kl at its coefficients, kl_mask over its
    bounds."""
    runs = [
        RunSpec(f"adaptive_guard{suffix}", None, 4, s, t)
        for t in cfg.adaptive_targets
        for s in seeds
    ]
    if not suffix:
        runs += [RunSpec("flow_grpo_kl", 1.0, 4, s, c) for c in cfg.kl_coefs for s in seeds]
    runs += _grid((f"kl_mask{suffix}",), cfg.kl_bounds, seeds)
    return runs


Shard = tuple[dict[str, Any], list[RunSpec]]
"""A worker: config overrides (``size`` selects the latent size, ``wave`` the group of
workers it runs beside, default 0; the rest are :class:`DemoConfig` fields) and its runs.
Waves run one after the other, so each fits the GPU's memory."""

EXPLORE_SEEDS = (100, 101, 102)
"""Exploration replicates (tuning only)."""

EXPLORE = dataclasses.replace(
    GPU,
    iterations=40,
    lr=1e-4,
    eval_samples=64,
    clip_scales=CLIP_GRID,
    kl_bounds=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 4.0),
    kl_coefs=(0.02, 0.1),
    adaptive_targets=(0.05, 0.15, 0.3),
    phase="exploration",
)


def plan_explore() -> tuple[DemoConfig, list[Shard]]:
    """Exploration, one wave: generator quality at three latent sizes; vanilla and GRPO-Guard
    over the clip grid at D = 4096 on three replicates; on one replicate, every other arm,
    lr 3e-4, 1 and 16 passes, Dance-SDE and the other latent sizes."""
    seeds = EXPLORE_SEEDS
    cfg = EXPLORE
    one = seeds[:1]
    shards: list[Shard] = [
        ({"size": 64}, _grid(PAIR, CLIP_GRID, seeds)),
        ({"size": 64, "lr": 3e-4}, _grid(PAIR, CLIP_GRID, one)),
        ({"size": 64}, _grid(CLIPPED[2:], CLIP_GRID, one) + _other_arms(cfg, one)),
        ({"size": 64}, _grid(PAIR, (1 / 16, 1 / 4, 1.0, None), one, passes=16)),
        ({"size": 64}, _grid(PAIR, (1.0,), one, passes=1)),
        ({"size": 64, "lr": 4e-4}, _grid(PAIR, (1.0,), one, passes=1)),
        ({"size": 64}, _grid(("flow_grpo_dance", "grpo_guard_dance"), CLIP_GRID, one)),
        ({"size": 32}, _grid(PAIR, CLIP_GRID, one)),
        ({"size": 128}, _grid(PAIR, CLIP_GRID, one)),
    ]
    return cfg, shards


PLANS = {"explore": plan_explore}


def _config(base: DemoConfig, overrides: dict[str, Any]) -> DemoConfig:
    size = overrides.get("size", base.size)
    fields = {k: v for k, v in overrides.items() if k not in ("size", "wave")}
    return dataclasses.replace(base, **SIZES.get(size, {}), **fields)


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", choices=sorted(PLANS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", type=Path, help="(internal) a worker's job file")
    parser.add_argument(
        "--budget",
        choices=sorted(PRESET_BUDGETS),
        default="gpu",
        help="config the plan runs on (tiny: a CPU check of this script)",
    )
    parser.add_argument("--time-limit", type=float, default=170.0, help="seconds per worker")
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker, args.out)
    cfg, shards = PLANS[args.plan]()
    cfg = dataclasses.replace(cfg, time_limit=args.time_limit)
    if args.budget != "gpu":  # a CPU check: the tiny network on every shard
        cfg = dataclasses.replace(cfg, **PRESET_BUDGETS[args.budget], device="cpu")
        shards = [({k: v for k, v in o.items() if k != "size"}, r[:2]) for o, r in shards]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sizes = sorted({o.get("size", cfg.size) for o, _ in shards})
    seeds = {
        s: sorted({r.seed for o, runs in shards if o.get("size", cfg.size) == s for r in runs})
        for s in sizes
    }
    pre_jobs = []
    for s in sizes:
        job = {"config": _config(cfg, {"size": s}).to_json(), "pretrain_only": True}
        pre_jobs.append(_spawn({**job, "seeds": seeds[s], "runs": []}, args.out / f"pretrain{s}"))
    codes = [p.wait() for p in pre_jobs]
    print(f"pretraining done ({time.perf_counter() - start:.0f} s), exit codes {codes}", flush=True)
    bases: dict[int, dict[str, float]] = {}
    for s in sizes:
        scfg = _config(cfg, {"size": s})
        device = torch.device(scfg.device)
        pre = load_or_pretrain(scfg, seeds[s], device)
        methods = sorted(
            {r.method for o, runs in shards if o.get("size", cfg.size) == s for r in runs}
        )
        world = DiscWorld(scfg.size)
        proxies = {seeds[s][0]: fit_proxy(world, seeds[s][0])}
        bases[s] = calibrate(scfg, methods, pre, proxies, device)
    print(f"bases {bases} ({time.perf_counter() - start:.0f} s)", flush=True)
    parts: list[Path] = []
    for wave in sorted({o.get("wave", 0) for o, _ in shards}):
        procs = []
        for index, (overrides, runs) in enumerate(shards):
            if overrides.get("wave", 0) != wave:
                continue
            scfg = _config(cfg, overrides)
            out = args.out / f"part{index}"
            job = {"config": scfg.to_json(), "bases": bases[scfg.size],
                   "runs": [dataclasses.asdict(r) for r in runs]}  # fmt: skip
            procs.append(_spawn(job, out))
            parts.append(out)
        codes += [p.wait() for p in procs]
        print(f"wave {wave} done ({time.perf_counter() - start:.0f} s)", flush=True)
    parts_json = [
        json.loads((p / "frontier.json").read_text())
        for p in parts
        if (p / "frontier.json").exists()
    ]
    merged: dict[str, Any] = {
        "device": parts_json[0]["device"] if parts_json else "?",
        "plan": args.plan,
        "seconds": time.perf_counter() - start,
        "config": cfg.to_json(),
        "shards": [
            {"part": p.name, "config": json.loads((p / "frontier.json").read_text())["config"]}
            for p in parts
            if (p / "frontier.json").exists()
        ],
        "pretrained": {
            f"size{p['config']['size']}/{k}": h
            for p in parts_json
            for k, h in p["pretrained"].items()
        },
        "proxies": {k: v for p in parts_json for k, v in p["proxies"].items()},
        "bases": {f"size{s}": b for s, b in bases.items()},
        "runs": [r for p in parts_json for r in p["runs"]],
    }
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
