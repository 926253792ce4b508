"""Run methods x seeds on identical seeds and budgets and write the summary JSON.

Layout of ``overopt.json``::

    {"methods": {name: {"seeds": [...], "clip_range": eps, "clip_target": f,
                        "eval": [{"seed", "step", "proxy", "gold_acc", "nn_dist",
                                  "diversity", "drift", "kl"}, ...],
                        "train": [{"seed", "step", "rollout_proxy", "pass2/...": ...}, ...],
                        "ratio_by_timestep": {"t", "count", "mean", "std", "log_mean",
                                              "log_std", "raw_mean", "raw_std": [...]},
                        "clip_by_timestep": {"frac", "pos_high", "pos_low", "neg_low",
                                             "neg_high": [...]}}},
     "clip_sweep": {name: [{"clip_target", "clip_range", "seed", "eval": [...]}]},
     "matched": {...}, "left_shift_vs_dim": {...}, "device": ..., "config": {...}}

``mean``/``std`` are the method's own ratio, ``raw_*`` the vanilla ratio of the same
transitions (before normalization), both from the second and later optimizer passes of
every rollout, pooled over seeds. The JSON is rewritten after every run, so an
interrupted experiment leaves a valid partial file.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..diagnostics import TimestepDiagnostics
from .analysis import matched_comparisons
from .config import DemoConfig
from .data import NUM_CLASSES, load_digits
from .dimension import left_shift_vs_dim
from .grpo import RunResult, calibrate, method_spec, train_run
from .pretrain import load_or_pretrain
from .rollout import time_schedule

__all__ = ["describe_device", "run_experiment", "timestep_tables"]

RATIO_KEYS = {
    "count": "count",
    "mean": "ratio/mean",
    "std": "ratio/std",
    "log_mean": "log_ratio/mean",
    "log_std": "log_ratio/std",
}
CLIP_KEYS = {key: f"clip/{key}" for key in ("frac", "pos_high", "pos_low", "neg_low", "neg_high")}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _columns(diag: TimestepDiagnostics, keys: dict[str, str]) -> dict[str, list[float]]:
    summary = diag.summary()
    return {out: [summary[k][key] for k in sorted(summary)] for out, key in keys.items()}


def timestep_tables(
    own: TimestepDiagnostics, raw: TimestepDiagnostics, times: list[float]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``ratio_by_timestep`` and ``clip_by_timestep`` of the JSON from the accumulators."""
    ratio = {
        "t": times,
        **_columns(own, RATIO_KEYS),
        **_columns(raw, {"raw_mean": "ratio/mean", "raw_std": "ratio/std"}),
    }
    return ratio, _columns(own, CLIP_KEYS)


def run_experiment(
    cfg: DemoConfig, out_dir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Pretrain (or load), calibrate clip ranges, run every method x seed, write outputs.

    Writes ``overopt.json`` and ``samples.npz`` (uint8 digits, ``<method>/start`` and
    ``<method>/end``, first seed) into ``out_dir`` and returns the summary dict.
    """
    start = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        # Rollout and training passes must agree to ~1e-7: no TF32 in convolutions.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits(cfg.size)
    pre = load_or_pretrain(cfg, digits, device)
    log(
        f"pretrained networks ({'cache' if pre.seconds == 0 else f'{pre.seconds:.0f} s'}), "
        f"D = {cfg.dim}, device {describe_device(device)}"
    )
    summary: dict[str, Any] = {
        "methods": {},
        "clip_sweep": {},
        "device": describe_device(device),
        "config": cfg.to_json(),
        "skipped": [],
        "pretrain_seconds": pre.seconds,
    }
    eval_noise = torch.randn(
        (NUM_CLASSES * cfg.eval_per_class, 1, cfg.size, cfg.size),
        generator=torch.Generator().manual_seed(12_345),
    ).to(device)
    if cfg.dims:
        summary["left_shift_vs_dim"] = left_shift_vs_dim(cfg, device)
    specs = [method_spec(name, cfg) for name in cfg.methods]
    clips = {spec.name: calibrate(spec, cfg, pre, cfg.clip_target) for spec in specs}
    log(
        f"clip ranges ({cfg.clip_target:.0%} of second-pass ratios outside on a probe): "
        + ", ".join(f"{name} {clip:.2e}" for name, clip in clips.items())
    )
    pooled = {spec.name: (TimestepDiagnostics(), TimestepDiagnostics()) for spec in specs}
    images: dict[str, np.ndarray] = {}
    jobs = [(seed, spec) for seed in cfg.seeds for spec in specs]
    bar = tqdm(total=len(jobs) * cfg.steps, desc="GRPO", unit="it", dynamic_ncols=True)
    last_run = 0.0
    for seed, spec in jobs:
        label = f"{spec.name} seed {seed}"
        run_start = time.perf_counter()
        if cfg.time_budget is not None and run_start - start + last_run > cfg.time_budget:
            summary["skipped"].append(label)
            bar.update(cfg.steps)
            continue
        bar.set_postfix_str(label)
        own, raw = pooled[spec.name]
        result = train_run(
            spec,
            cfg,
            pre,
            digits,
            clips[spec.name],
            seed,
            eval_noise,
            on_iteration=lambda: bar.update(1),
            ratio=own,
            raw_ratio=raw,
        )
        _record(summary, images, spec.name, seed, clips[spec.name], result, pooled, cfg)
        summary["matched"] = matched_comparisons(summary["methods"])
        summary["seconds"] = time.perf_counter() - start
        _write(summary, images, out_dir)
        last_run = time.perf_counter() - run_start
        log(
            f"{label}: {last_run:.0f} s, proxy {result.evals[0]['proxy']:.2f} -> "
            f"{result.evals[-1]['proxy']:.2f}, gold_acc {result.evals[0]['gold_acc']:.2f} -> "
            f"{result.evals[-1]['gold_acc']:.2f}"
        )
    bar.close()
    summary["seconds"] = time.perf_counter() - start
    _write(summary, images, out_dir)
    return summary


def _record(
    summary: dict[str, Any],
    images: dict[str, np.ndarray],
    name: str,
    seed: int,
    clip: float,
    result: RunResult,
    pooled: dict[str, tuple[TimestepDiagnostics, TimestepDiagnostics]],
    cfg: DemoConfig,
) -> None:
    entry = summary["methods"].setdefault(
        name,
        {"seeds": [], "clip_range": clip, "clip_target": cfg.clip_target, "eval": [], "train": []},
    )
    entry["seeds"].append(seed)
    entry["eval"] += [{"seed": seed, **e} for e in result.evals]
    entry["train"] += [{"seed": seed, **e} for e in result.train]
    times = time_schedule(cfg.num_steps, method_spec(name, cfg).shift)[:-1].tolist()
    entry["ratio_by_timestep"], entry["clip_by_timestep"] = timestep_tables(*pooled[name], times)
    if seed == cfg.seeds[0]:
        for stage, batch in result.images.items():
            images[f"{name}/{stage}"] = ((batch.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def _write(summary: dict[str, Any], images: dict[str, np.ndarray], out_dir: Path) -> None:
    (out_dir / "overopt.json").write_text(json.dumps(summary, indent=1))
    arrays: dict[str, Any] = dict(images)
    np.savez_compressed(out_dir / "samples.npz", **arrays)
