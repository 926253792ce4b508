"""The frontier experiment on one GPU: many worker processes share it, each an ensemble.

    python benchmarks/frontier_gpu.py --plan pilot --out OUT [--workers N]

1. Pretrains the generators (or loads them from ``$REGCLIP_CACHE``; checkpoints are written
   there so a later call can carry them and reuse them by hash), fits the raters and
   calibrates every method's base clip range once.
2. Splits the plan's runs into groups that share a kernel and passes, spreads them over
   ``--workers`` processes (``--worker`` mode of this script), and waits.
3. Merges the workers' ``frontier.json`` files into ``OUT/frontier.json``.

Plans are fixed lists of arms, written down before they were run (see ``PLANS``).
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

import torch

from regclip.demo.arms import RunSpec
from regclip.demo.config import PRESET_BUDGETS, DemoConfig
from regclip.demo.engine import calibrate
from regclip.demo.experiment import dump_compact, run_experiment
from regclip.demo.pretrain import load_or_pretrain
from regclip.demo.reward import fit_proxy
from regclip.demo.world import DiscWorld

GPU = dataclasses.replace(DemoConfig(), **PRESET_BUDGETS["gpu"], device="cuda")


def _grid(methods, scales, passes, seeds):
    return [RunSpec(m, s, p, seed) for m in methods for s in scales for p in passes for seed in seeds]


def plan_pilot() -> tuple[DemoConfig, list[tuple[dict, list[RunSpec]]]]:
    """Knob finding: does vanilla hack, how fast, at two learning rates (2 seeds)."""
    base = ("flow_grpo", "grpo_guard", "velocity_guard")
    grid = _grid(base, (0.25, 1.0, 4.0, None), (4,), (0, 1))
    shards = [({"lr": 1e-4}, grid), ({"lr": 3e-4}, grid),
              ({"lr": 1e-4}, _grid(("flow_grpo", "grpo_guard"), (1.0,), (16,), (0, 1)))]
    return GPU, shards


PLANS = {"pilot": plan_pilot}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", choices=sorted(PLANS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", type=Path, help="(internal) a worker's job file")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--budget", choices=sorted(PRESET_BUDGETS), default="gpu",
                        help="config the plan runs on (tiny: a CPU check of this script)")
    parser.add_argument("--time-limit", type=float, help="seconds per worker ensemble")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker.read_text())
        cfg = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
        runs = [RunSpec(**r) for r in job["runs"]]
        run_experiment(cfg, args.out, runs, bases=job["bases"], keep_images=8,
                       log=lambda m: print(f"[{args.out.name}] {m}", flush=True))
        return 0
    cfg, shards = PLANS[args.plan]()
    pairs = (("lr", args.lr), ("iterations", args.iterations), ("time_limit", args.time_limit))
    overrides = {k: v for k, v in pairs if v is not None}
    if args.budget != "gpu":
        overrides |= dict(PRESET_BUDGETS[args.budget], device="cpu")
    cfg = dataclasses.replace(cfg, **overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    all_runs = [r for _, shard in shards for r in shard]
    device = torch.device(cfg.device)
    pre = load_or_pretrain(cfg, sorted({r.pretrain_seed for r in all_runs}), device)
    print(f"pretrained {pre.hashes} in {pre.seconds:.0f} s", flush=True)
    world = DiscWorld(cfg.size)
    proxies = {s: fit_proxy(world, s) for s in sorted({r.reward_seed for r in all_runs})}
    bases = calibrate(cfg, sorted({r.method for r in all_runs}), pre, proxies, device)
    print(f"bases {bases} ({time.perf_counter() - start:.0f} s)", flush=True)
    procs = []
    for i, (shard_overrides, shard) in enumerate(shards):
        job = args.out / f"job{i}.json"
        shard_cfg = dataclasses.replace(cfg, **shard_overrides)
        job.write_text(json.dumps({"config": shard_cfg.to_json(), "bases": bases,
                                   "runs": [dataclasses.asdict(r) for r in shard]}))
        procs.append(subprocess.Popen([sys.executable, __file__, "--out", str(args.out / f"part{i}"),
                                       "--worker", str(job)]))
    codes = [p.wait() for p in procs]
    parts = [json.loads((args.out / f"part{i}" / "frontier.json").read_text())
             for i in range(len(shards)) if (args.out / f"part{i}" / "frontier.json").exists()]
    merged = {k: v for k, v in parts[0].items() if k != "runs"} if parts else {}
    merged["seconds"] = time.perf_counter() - start
    merged["plan"] = args.plan
    merged["runs"] = [r for p in parts for r in p["runs"]]
    dump_compact(merged, args.out / "frontier.json")
    print(f"merged {len(merged['runs'])} runs, worker exit codes {codes}, "
          f"{merged['seconds']:.0f} s", flush=True)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    sys.exit(main())
