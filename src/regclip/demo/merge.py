"""Merge ``overopt.json`` files of runs made in parallel (one process per seed, and clip
sweeps at other clip targets) into one summary.

``python -m regclip.demo.merge OUT MAIN_DIR... [--sweep SWEEP_DIR...]``: the main dirs'
methods are concatenated over seeds (per-timestep means and stds pooled exactly from their
counts; clip fractions weighted by the same counts), the sweep dirs' runs become
``clip_sweep`` entries, and the matched comparisons are recomputed. ``samples.npz`` is
taken from the first main dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .analysis import matched_comparisons

__all__ = ["merge_summaries", "pool_timesteps"]


def pool_timesteps(
    tables: list[dict[str, list[float]]],
    counts: list[list[float]],
    pairs: tuple[tuple[str, str], ...],
) -> dict[str, list[float]]:
    """Pool per-timestep columns of several runs: (mean, std) pairs exactly, other columns
    as count-weighted means."""
    total = [sum(c[k] for c in counts) for k in range(len(counts[0]))]
    out: dict[str, list[float]] = {}
    paired = {name for pair in pairs for name in pair}
    for key in tables[0]:
        if key in paired or key in ("t", "count"):
            continue
        out[key] = [
            sum(tab[key][k] * c[k] for tab, c in zip(tables, counts, strict=True))
            / max(total[k], 1)
            for k in range(len(total))
        ]
    for mean_key, std_key in pairs:
        means, stds = [], []
        for k in range(len(total)):
            mean = sum(t[mean_key][k] * c[k] for t, c in zip(tables, counts, strict=True))
            mean /= max(total[k], 1)
            second = sum(
                (t[std_key][k] ** 2 + t[mean_key][k] ** 2) * c[k]
                for t, c in zip(tables, counts, strict=True)
            ) / max(total[k], 1)
            means.append(mean)
            stds.append(max(second - mean**2, 0.0) ** 0.5)
        out[mean_key], out[std_key] = means, stds
    return out


RATIO_PAIRS = (("mean", "std"), ("log_mean", "log_std"), ("raw_mean", "raw_std"))


def merge_summaries(mains: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from per-seed summaries (``mains``) and clip-sweep summaries."""
    merged: dict[str, Any] = {key: mains[0][key] for key in ("device", "config")}
    merged["config"] = {
        **merged["config"],
        "seeds": sorted({s for m in mains for e in m["methods"].values() for s in e["seeds"]}),
    }
    merged["skipped"] = [s for m in mains + sweeps for s in m.get("skipped", [])]
    merged["seconds"] = max(m.get("seconds", 0.0) for m in mains + sweeps)
    merged["methods"] = {}
    for name in mains[0]["methods"]:
        parts = [m["methods"][name] for m in mains if name in m["methods"]]
        ratio_tabs = [p["ratio_by_timestep"] for p in parts]
        counts = [tab["count"] for tab in ratio_tabs]
        merged["methods"][name] = {
            "seeds": [s for p in parts for s in p["seeds"]],
            "clip_range": parts[0]["clip_range"],
            "clip_target": parts[0]["clip_target"],
            "eval": [e for p in parts for e in p["eval"]],
            "train": [e for p in parts for e in p["train"]],
            "ratio_by_timestep": {
                "t": ratio_tabs[0]["t"],
                "count": [sum(c[k] for c in counts) for k in range(len(counts[0]))],
                **pool_timesteps(ratio_tabs, counts, RATIO_PAIRS),
            },
            "clip_by_timestep": pool_timesteps([p["clip_by_timestep"] for p in parts], counts, ()),
        }
    merged["clip_sweep"] = {}
    for sweep in sweeps:
        for name, entry in sweep["methods"].items():
            merged["clip_sweep"].setdefault(name, []).append(
                {
                    "clip_target": entry["clip_target"],
                    "kl_coef": sweep["config"]["kl_coef"],
                    "clip_range": entry["clip_range"],
                    "seeds": entry["seeds"],
                    "eval": entry["eval"],
                }
            )
    merged["matched"] = matched_comparisons(merged["methods"])
    shift = next((m["left_shift_vs_dim"] for m in mains if "left_shift_vs_dim" in m), None)
    if shift is not None:
        merged["left_shift_vs_dim"] = shift
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regclip.demo.merge", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("mains", type=Path, nargs="+")
    parser.add_argument("--sweep", type=Path, nargs="*", default=[])
    args = parser.parse_args(argv)

    def load(folder: Path) -> dict[str, Any]:
        return json.loads((folder / "overopt.json").read_text())

    mains = [load(d) for d in args.mains if (d / "overopt.json").is_file()]
    sweeps = [load(d) for d in args.sweep if (d / "overopt.json").is_file()]
    if not mains:
        print("no overopt.json in the main folders", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overopt.json").write_text(json.dumps(merge_summaries(mains, sweeps), indent=1))
    first = args.mains[0] / "samples.npz"
    if first.is_file() and first.resolve() != (args.out / "samples.npz").resolve():
        shutil.copy(first, args.out / "samples.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
