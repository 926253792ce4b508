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
    return [
        RunSpec(m, s, p, seed) for m in methods for s in scales for p in passes for seed in seeds
    ]


Shard = tuple[dict, list[RunSpec]]
"""A worker: config overrides and its runs. Overrides with ``size`` make the worker pretrain
(or load) its own generators and calibrate its own clip ranges; ``pretrain_only`` stops
there."""


def plan_pilot() -> tuple[DemoConfig, list[list[Shard]]]:
    """Knob finding on GRPO seeds 0 and 1: does vanilla hack, how fast, at two learning rates;
    every arm once on the GPU. Its results chose lr 1e-4 and 60 iterations for ``main``."""
    seeds = (0, 1)
    grid = _grid(("flow_grpo", "grpo_guard", "velocity_guard"), (0.25, 1.0, 4.0, None), (4,), seeds)
    grid += _grid(("adaptive_guard",), (None,), (4,), seeds)
    grid += _grid(("kl_mask", "flow_grpo_kl"), (1.0,), (4,), seeds)
    dance = _grid(
        ("flow_grpo_dance", "grpo_guard_dance", "adaptive_guard_dance"), (1.0,), (4,), seeds
    )
    return GPU, [
        [
            ({"lr": 1e-4}, grid),
            ({"lr": 3e-4}, grid),
            ({"lr": 1e-4}, dance),
            ({"lr": 1e-4}, _grid(("flow_grpo", "grpo_guard"), (1.0,), (16,), seeds)),
        ]
    ]


SMALL = {"size": 32, "patch": 4, "pretrain_steps": 2000}
"""The second latent size (D = 1024): the same network on 4 x 4 patches."""


def plan_main() -> tuple[DemoConfig, list[list[Shard]]]:
    """The comparison, on GRPO seeds 10-14 (not used by the pilot), in two waves that each
    fit the GPU's memory."""
    seeds = (10, 11, 12, 13, 14)
    scales = (0.25, 1.0, 4.0, None)
    cfg = dataclasses.replace(GPU, lr=1e-4, iterations=60, eval_every=5)
    wave1 = [
        ({}, _grid(("flow_grpo", "grpo_guard"), scales, (4,), seeds)),
        ({}, _grid(("velocity_guard", "ratio_norm"), scales, (4,), seeds)),
        (
            {},
            _grid(("flow_grpo_kl",), scales, (4,), seeds)
            + _grid(("adaptive_guard",), (None,), (4,), seeds)
            + _grid(("kl_mask",), (0.25, 1.0, 4.0), (4,), seeds),
        ),
        ({}, _grid(("flow_grpo", "grpo_guard", "velocity_guard"), (1.0,), (1,), seeds)),
        ({}, _grid(("flow_grpo", "grpo_guard", "velocity_guard"), (1.0,), (16,), seeds)),
        ({**SMALL, "pretrain_only": True}, [RunSpec("flow_grpo", 1.0, 4, s) for s in (0, 1)]),
    ]
    wave2 = [
        ({}, _grid(("flow_grpo_dance", "grpo_guard_dance"), (0.25, 1.0, 4.0), (4,), seeds)),
        (
            {},
            _grid(("velocity_guard_dance",), (0.25, 1.0, 4.0), (4,), seeds)
            + _grid(("adaptive_guard_dance",), (None,), (4,), seeds)
            + _grid(("kl_mask_dance",), (1.0,), (4,), seeds),
        ),
        (
            SMALL,
            _grid(("flow_grpo", "grpo_guard", "velocity_guard"), (0.25, 1.0, 4.0), (4,), seeds)
            + _grid(("adaptive_guard",), (None,), (4,), seeds)
            + _grid(("kl_mask",), (1.0,), (4,), seeds),
        ),
    ]
    return cfg, [wave1, wave2]


PLANS = {"pilot": plan_pilot, "main": plan_main}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", choices=sorted(PLANS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", type=Path, help="(internal) a worker's job file")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--iterations", type=int)
    parser.add_argument(
        "--budget",
        choices=sorted(PRESET_BUDGETS),
        default="gpu",
        help="config the plan runs on (tiny: a CPU check of this script)",
    )
    parser.add_argument("--time-limit", type=float, help="seconds per worker ensemble")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()}
        cfg = DemoConfig(**fields)
        runs = [RunSpec(**r) for r in job["runs"]]
        if job.get("pretrain_only"):
            pre = load_or_pretrain(
                cfg, sorted({r.pretrain_seed for r in runs}), torch.device(cfg.device)
            )
            print(f"[{args.out.name}] pretrained {pre.hashes} in {pre.seconds:.0f} s", flush=True)
            return 0
        run_experiment(
            cfg,
            args.out,
            runs,
            bases=job["bases"],
            keep_images=8,
            log=lambda m: print(f"[{args.out.name}] {m}", flush=True),
        )
        return 0
    cfg, waves = PLANS[args.plan]()
    pairs = (("lr", args.lr), ("iterations", args.iterations), ("time_limit", args.time_limit))
    overrides = {k: v for k, v in pairs if v is not None}
    if args.budget != "gpu":
        overrides |= dict(PRESET_BUDGETS[args.budget], device="cpu")
    cfg = dataclasses.replace(cfg, **overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    main_runs = [r for wave in waves for o, shard in wave if "size" not in o for r in shard]
    device = torch.device(cfg.device)
    pre = load_or_pretrain(cfg, sorted({r.pretrain_seed for r in main_runs}), device)
    print(f"pretrained {pre.hashes} in {pre.seconds:.0f} s", flush=True)
    world = DiscWorld(cfg.size)
    proxies = {s: fit_proxy(world, s) for s in sorted({r.reward_seed for r in main_runs})}
    bases = calibrate(cfg, sorted({r.method for r in main_runs}), pre, proxies, device)
    print(f"bases {bases} ({time.perf_counter() - start:.0f} s)", flush=True)
    codes, parts = [], []
    index = 0
    for wave in waves:
        procs = []
        for shard_overrides, shard in wave:
            job = args.out / f"job{index}.json"
            extra = {k: v for k, v in shard_overrides.items() if k != "pretrain_only"}
            if args.budget != "gpu":
                extra = {k: v for k, v in extra.items() if k not in ("size", "patch")}
            shard_cfg = dataclasses.replace(cfg, **extra)
            job.write_text(
                json.dumps(
                    {
                        "config": shard_cfg.to_json(),
                        "bases": None if "size" in shard_overrides else bases,
                        "pretrain_only": shard_overrides.get("pretrain_only", False),
                        "runs": [dataclasses.asdict(r) for r in shard],
                    }
                )
            )
            out = args.out / f"part{index}"
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--out", str(out), "--worker", str(job)]
                )
            )
            parts.append(out)
            index += 1
        codes += [p.wait() for p in procs]
    parts_json = [
        json.loads((p / "frontier.json").read_text())
        for p in parts
        if (p / "frontier.json").exists()
    ]
    merged = {k: v for k, v in parts_json[0].items() if k != "runs"} if parts_json else {}
    merged["seconds"] = time.perf_counter() - start
    merged["plan"] = args.plan
    merged["pretrained"] = {
        f"size{p['config']['size']}/{k}": h for p in parts_json for k, h in p["pretrained"].items()
    }
    merged["bases"] = {
        f"size{p['config']['size']}/{k}": b for p in parts_json for k, b in p["bases"].items()
    }
    merged["runs"] = [r for p in parts_json for r in p["runs"]]
    dump_compact(merged, args.out / "frontier.json")
    print(
        f"merged {len(merged['runs'])} runs, worker exit codes {codes}, {merged['seconds']:.0f} s",
        flush=True,
    )
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    sys.exit(main())
