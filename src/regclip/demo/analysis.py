"""Comparisons at matched proxy reward and at matched KL (not only at matched steps).

Each run's evaluation curve is read in step order; the value of a metric at a level of
the x-axis (proxy or kl) is linearly interpolated at the first crossing of that level.
Levels are fractions of the gain that *every* compared run reached, so every method is
read at the same x in every seed.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

from .metrics import GOLD_METRICS

__all__ = ["FRACTIONS", "matched_comparisons", "value_at_level"]

FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


def value_at_level(
    curve: list[dict[str, float]], axis: str, level: float, metric: str
) -> float | None:
    """``metric`` where ``curve[axis]`` first reaches ``level`` (None if it never does)."""
    for before, after in itertools.pairwise(curve):
        lo, hi = before[axis], after[axis]
        if (lo - level) * (hi - level) <= 0 and hi != lo:
            w = (level - lo) / (hi - lo)
            return before[metric] + w * (after[metric] - before[metric])
    return curve[0][metric] if curve and curve[0][axis] == level else None


def _curves(entry: dict[str, Any]) -> list[list[dict[str, float]]]:
    by_seed: dict[int, list[dict[str, float]]] = defaultdict(list)
    for row in entry["eval"]:
        by_seed[row["seed"]].append(row)
    return [sorted(rows, key=lambda r: r["step"]) for rows in by_seed.values()]


def _stats(values: list[float]) -> dict[str, float | int]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / max(n - 1, 1)) ** 0.5
    return {"mean": mean, "std": std, "n": n}


def _matched(methods: dict[str, Any], axis: str, exclude: set[str]) -> dict[str, Any]:
    curves = {name: _curves(entry) for name, entry in methods.items()}
    compared = [c for name, cs in curves.items() if name not in exclude for c in cs]
    if not compared:
        return {}
    start = compared[0][0][axis]
    reach = min(max(row[axis] for row in c) for c in compared)
    if reach <= start:
        return {"levels": [], "note": f"some run never raised {axis} above its start"}
    levels = [start + f * (reach - start) for f in FRACTIONS]
    metrics = [m for m in ("proxy", *GOLD_METRICS) if m != axis]
    table: dict[str, Any] = {}
    for name, cs in curves.items():
        table[name] = {}
        for metric in metrics:
            per_level = []
            for level in levels:
                values = [
                    v for c in cs if (v := value_at_level(c, axis, level, metric)) is not None
                ]
                per_level.append(_stats(values) if values else None)
            table[name][metric] = per_level
    return {
        "levels": levels,
        "fractions": list(FRACTIONS),
        "excluded_from_levels": sorted(exclude),
        "at": table,
    }


def matched_comparisons(methods: dict[str, Any]) -> dict[str, Any]:
    """Gold metrics at matched proxy (levels set by the runs without KL penalty) and
    proxy/gold at matched KL (levels set by all runs)."""
    return {
        "proxy": _matched(methods, "proxy", {n for n in methods if n.endswith("_kl")}),
        "kl": _matched(methods, "kl", set()),
    }
