"""Run a grid of arms and write ``frontier.json``.

Layout (compact JSON, one run per line)::

    {"device": "...", "config": {...}, "pretrained": {"0": hash, ...},
     "proxies": {"0": {"background": g_b, "disc": g_d}, ...}, "bases": {method: eps},
     "runs": [{"method", "sde", "clip_scale", "option", "setting", "clip_range", "seed",
               "generator_seed", "pretrain_hash", "rater_seed", "phase", "passes", "lr",
               "size", "optimizer_steps", "clip_by_step": [T floats],
               "curve": [{"iteration", "proxy", "gold", "hack", "contrast", "residual",
                          "rollout_proxy", "pass2/...", "last/..."}, ...]}, ...]}

``seed`` is the replicate; ``generator_seed`` and ``rater_seed`` name its own pretrained
generator and proxy rater. The curve has a record at every ``eval_every``-th iteration.

``gold`` is higher-is-better (ceiling 1), ``hack`` the fitted background brightness. Training
metrics in a curve record are means over the iterations since the previous record.
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .arms import RunSpec, parse_method
from .config import DemoConfig
from .engine import RunRecord, calibrate, run_ensemble
from .pretrain import load_or_pretrain
from .reward import fit_proxy
from .world import DiscWorld

__all__ = ["default_runs", "describe_device", "dump_compact", "run_experiment"]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def default_runs(cfg: DemoConfig) -> list[RunSpec]:
    """``cfg.methods`` x settings x ``cfg.passes`` x ``cfg.seeds``: ``cfg.clip_scales`` for
    clipped methods, ``cfg.kl_bounds`` for ``kl_mask``, ``cfg.adaptive_targets`` for
    ``adaptive_guard`` and ``cfg.kl_coefs`` (at the calibrated clip) for ``flow_grpo_kl``."""
    runs = []
    for method in cfg.methods:
        base, _ = parse_method(method)
        by_method: dict[str, list[tuple[float | None, float | None]]] = {
            "adaptive_guard": [(None, t) for t in cfg.adaptive_targets],
            "flow_grpo_kl": [(1.0, c) for c in cfg.kl_coefs],
            "kl_mask": [(b, None) for b in cfg.kl_bounds],
        }
        settings = by_method.get(base, [(s, None) for s in cfg.clip_scales])
        runs += [
            RunSpec(method, scale, passes, seed, option)
            for scale, option in settings
            for passes in cfg.passes
            for seed in cfg.seeds
        ]
    return runs


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def dump_compact(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as JSON without indentation, one run per line, floats to 5 digits."""
    meta = [
        f"{json.dumps(k)}:{json.dumps(_round(v), separators=(',', ':'))}"
        for k, v in result.items()
        if k != "runs"
    ]
    runs = [json.dumps(_round(r), separators=(",", ":")) for r in result.get("runs", [])]
    text = "{" + ",\n".join(meta) + ',\n"runs":[\n' + ",\n".join(runs) + "\n]}\n"
    path.write_text(text)


def _record_json(rec: RunRecord, cfg: DemoConfig, hashes: dict[int, str]) -> dict[str, Any]:
    spec = rec.spec
    curve = []
    prev = 0.0
    for row in rec.curve:
        window = [t for t in rec.train if prev < t["iteration"] <= row["iteration"]]
        prev = row["iteration"]
        extra = {
            k: sum(t[k] for t in window) / len(window)
            for k in (window[0] if window else {})
            if k != "iteration"
        }
        curve.append({**row, **extra})
    steps = [c for c in rec.clip_by_step if c]
    clip_by_step = [sum(col) / len(col) for col in zip(*steps, strict=True)] if steps else []
    return {
        "method": spec.method,
        "sde": spec.sde,
        "clip_scale": spec.clip_scale,
        "option": spec.option,
        "setting": spec.setting,
        "clip_range": rec.clip_range,
        "seed": spec.seed,
        "generator_seed": spec.generator_seed,
        "pretrain_hash": hashes[spec.generator_seed],
        "rater_seed": spec.rater_seed,
        "phase": cfg.phase,
        "passes": spec.passes,
        "lr": cfg.lr,
        "size": cfg.size,
        "optimizer_steps": rec.optimizer_steps,
        "clip_by_step": clip_by_step,
        **({"final_ranges": rec.final_ranges} if rec.final_ranges else {}),
        "curve": curve,
    }


def run_experiment(
    cfg: DemoConfig,
    out: Path,
    runs: Sequence[RunSpec] | None = None,
    log: Callable[[str], None] = print,
    keep_images: int = 8,
    bases: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Pretrain (or load), fit the raters, calibrate (unless ``bases`` are given), train
    every run; write ``out/frontier.json`` and ``out/samples.pt`` (start and end samples of
    the first seed's runs)."""
    start = time.perf_counter()
    device = torch.device(cfg.device)
    runs = list(runs) if runs is not None else default_runs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pre = load_or_pretrain(cfg, sorted({r.generator_seed for r in runs}), device, log)
    world = DiscWorld(cfg.size)
    proxies = {s: fit_proxy(world, s) for s in sorted({r.rater_seed for r in runs})}
    if bases is None:
        bases = calibrate(cfg, sorted({r.method for r in runs}), pre, proxies, device)
    log("calibrated clip ranges: " + ", ".join(f"{m} {b:.3g}" for m, b in bases.items()))
    groups: dict[tuple[str, int], list[RunSpec]] = defaultdict(list)
    for r in runs:
        groups[(r.sde, r.passes)].append(r)
    records: list[RunRecord] = []
    for (sde, passes), group in groups.items():
        log(f"{len(group)} runs on {sde}-SDE with {passes} pass(es) per rollout")
        records += run_ensemble(cfg, group, pre, proxies, bases, device, log, keep_images)
    result: dict[str, Any] = {
        "device": describe_device(device),
        "config": cfg.to_json(),
        "seconds": time.perf_counter() - start,
        "pretrained": {str(s): h for s, h in pre.hashes.items()},
        "proxies": {str(s): p.sensitivity for s, p in proxies.items()},
        "bases": bases,
        "runs": [_record_json(r, cfg, pre.hashes) for r in records],
    }
    dump_compact(result, out / "frontier.json")
    first_seed = min(r.seed for r in runs)
    samples = {  # 8-bit, as image files are: keeps the archive small at large D
        f"{r.spec.method}|{r.spec.setting}|{r.spec.passes}|{key}": (img * 255)
        .round()
        .to(torch.uint8)
        for r in records
        if r.spec.seed == first_seed
        for key, img in r.images.items()
    }
    torch.save(samples, out / "samples.pt")
    return result
