"""Merge ``overopt.json`` files of runs made in parallel (one process per seed, and clip
sweeps at other clip targets) into one summary.

``python -m regclip.demo.merge OUT MAIN_DIR... [--sweep SWEEP_DIR...]``: the main dirs'
methods are concatenated over seeds (per-timestep means and stds pooled exactly from their
counts; clip fractions weighted by the same counts), the sweep dirs' runs become
``clip_sweep`` entries, and the matched comparisons are recomputed. A main dir may hold an
already merged summary (its ``clip_sweep`` entries are kept), so a later run of other
methods at the same configuration can be added to an earlier one; the configurations must
agree on everything but the methods, seeds, left-shift dims and time budget. ``samples.npz``
holds every main dir's digit grids (the first dir holding a method's grids wins).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

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
FREE_CONFIG_KEYS = frozenset({"methods", "seeds", "dims", "time_budget"})
"""Config entries that may differ between the merged main summaries."""


def check_same_config(configs: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` when two main summaries differ outside :data:`FREE_CONFIG_KEYS`."""
    for config in configs[1:]:
        diff = {
            key
            for key in set(config) | set(configs[0])
            if key not in FREE_CONFIG_KEYS and config.get(key) != configs[0].get(key)
        }
        if diff:
            raise ValueError(f"main summaries differ in config {sorted(diff)}")


def merge_summaries(mains: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from per-seed summaries (``mains``) and clip-sweep summaries."""
    check_same_config([m["config"] for m in mains])
    merged: dict[str, Any] = {key: mains[0][key] for key in ("device", "config")}
    merged["config"] = {
        **merged["config"],
        "seeds": sorted({s for m in mains for e in m["methods"].values() for s in e["seeds"]}),
    }
    merged["seconds"] = max(m.get("seconds", 0.0) for m in mains + sweeps)
    merged["methods"] = {}
    for name in dict.fromkeys(name for m in mains for name in m["methods"]):
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
    done = {f"{name} seed {s}" for name, e in merged["methods"].items() for s in e["seeds"]}
    merged["skipped"] = [s for m in mains for s in m.get("skipped", []) if s not in done]
    merged["skipped"] += [s for m in sweeps for s in m.get("skipped", [])]
    merged["skipped"] = list(dict.fromkeys(merged["skipped"]))
    merged["clip_sweep"] = {}
    for main in mains:
        for name, entries in main.get("clip_sweep", {}).items():
            merged["clip_sweep"].setdefault(name, []).extend(entries)
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
    grids: dict[str, Any] = {}
    for folder in args.mains:
        if (folder / "samples.npz").is_file():
            with np.load(folder / "samples.npz") as stored:
                for key in stored.files:
                    grids.setdefault(key, stored[key])
    np.savez_compressed(args.out / "samples.npz", **grids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
