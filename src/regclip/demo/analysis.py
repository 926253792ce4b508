"""Frontier analysis: gold at matched proxy gain, speed, paired differences with intervals.

A *run* here is one entry of ``frontier.json``'s ``runs``: ``method``, ``clip_scale``,
``seed``, ``passes`` and ``curve`` (records of ``iteration``, ``proxy``, ``gold``, ``hack``).
Proxy *gain* is the proxy minus the run's own proxy at iteration 0, so generators and raters
of different seeds compare on one axis.

- :func:`at_gain` reads a curve at the first iteration where the gain reaches a level
  (linear interpolation between evaluations): the gold there, the hack there and the
  (fractional) number of iterations it took: the run's *speed*.
- :func:`paired` compares two methods run for run: same seed (so the same pretrained
  generator, proxy rater and first rollout) and same clip scale, and bootstraps the mean
  difference over seeds.
- :func:`frontier_gap` compares the best gold each method reaches over its clip settings,
  seed by seed (the upper envelope of the frontier).
- :func:`speed_adjusted` fits ``gold ~ method + log(iterations) + seed`` by least squares
  and bootstraps seeds, so a method is compared with vanilla *at the same speed*.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "at_gain",
    "bootstrap_mean",
    "frontier_gap",
    "gain_levels",
    "hacks",
    "paired",
    "speed_adjusted",
]

Run = dict[str, Any]


def at_gain(curve: Sequence[dict[str, float]], level: float) -> dict[str, float] | None:
    """``iteration``, ``gold``, ``hack`` where the proxy gain first reaches ``level``
    (interpolated), or None if it never does (or ``level <= 0``)."""
    if level <= 0:
        return None
    start = curve[0]["proxy"]
    prev = curve[0]
    for row in curve[1:]:
        gain, prev_gain = row["proxy"] - start, prev["proxy"] - start
        if gain >= level:
            w = 1.0 if gain == prev_gain else (level - prev_gain) / (gain - prev_gain)
            return {k: prev[k] + w * (row[k] - prev[k]) for k in ("iteration", "gold", "hack")}
        prev = row
    return None


def hacks(run: Run) -> bool:
    """Gold at the end below gold at the start while the proxy rose."""
    first, last = run["curve"][0], run["curve"][-1]
    return last["gold"] < first["gold"] and last["proxy"] > first["proxy"]


def gain_levels(runs: Sequence[Run], fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> list[float]:
    """Proxy-gain levels: ``fractions`` of the median final gain over ``runs``."""
    finals = torch.tensor([r["curve"][-1]["proxy"] - r["curve"][0]["proxy"] for r in runs])
    median = float(finals.median())
    return [round(f * median, 4) for f in fractions]


def bootstrap_mean(
    values: Sequence[float], resamples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean and 95 % percentile-bootstrap interval of ``values`` (one per seed)."""
    x = torch.tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (resamples, len(x)), generator=gen)
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": len(x)}


def _key(run: Run) -> tuple:
    return (run["clip_scale"], run["passes"], run.get("lr"), run["seed"])


def paired(runs: Sequence[Run], method: str, baseline: str, level: float) -> dict[str, Any] | None:
    """Gold difference (method - baseline) at proxy gain ``level``, paired by clip scale,
    passes, learning rate and seed, averaged within each seed, bootstrapped over seeds. Also the
    difference in iterations to the level and in hack."""
    index = {(r["method"], *_key(r)): r for r in runs}
    per_seed: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for r in runs:
        if r["method"] != method:
            continue
        other = index.get((baseline, *_key(r)))
        if other is None:
            continue
        a, b = at_gain(r["curve"], level), at_gain(other["curve"], level)
        if a is None or b is None:
            continue
        per_seed[r["seed"]].append(
            (
                a["gold"] - b["gold"],
                a["hack"] - b["hack"],
                math.log(a["iteration"] / b["iteration"]),
            )
        )
    if len(per_seed) < 2:
        return None
    means = [[sum(v[i] for v in vals) / len(vals) for i in range(3)] for vals in per_seed.values()]
    return {
        "gold": bootstrap_mean([m[0] for m in means]),
        "hack": bootstrap_mean([m[1] for m in means]),
        "log_iter_ratio": bootstrap_mean([m[2] for m in means]),
        "pairs": sum(len(v) for v in per_seed.values()),
    }


def frontier_gap(
    runs: Sequence[Run], method: str, baseline: str, level: float
) -> dict[str, Any] | None:
    """Per seed and passes, the best gold over clip settings at proxy gain ``level`` of
    ``method`` minus that of ``baseline``; bootstrapped over seeds."""
    best: dict[tuple[str, int, int], float] = {}
    for r in runs:
        if r["method"] not in (method, baseline):
            continue
        hit = at_gain(r["curve"], level)
        if hit is None:
            continue
        key = (r["method"], r["passes"], r["seed"])
        best[key] = max(best.get(key, -math.inf), hit["gold"])
    diffs: dict[int, list[float]] = defaultdict(list)
    for (m, passes, seed), gold in best.items():
        if m == method and (baseline, passes, seed) in best:
            diffs[seed].append(gold - best[(baseline, passes, seed)])
    if len(diffs) < 2:
        return None
    return {"gold": bootstrap_mean([sum(v) / len(v) for v in diffs.values()]), "seeds": len(diffs)}


def _ols(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(x, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def speed_adjusted(
    runs: Sequence[Run], baseline: str, level: float, resamples: int = 2000, seed: int = 0
) -> dict[str, Any] | None:
    """Fit ``gold = sum_m beta_m [method = m] + gamma log(iterations) + seed effect`` over
    every run reaching proxy gain ``level``; each ``beta_m - beta_baseline`` is method m's
    gold advantage over the baseline at equal speed. Intervals: bootstrap over seeds."""
    rows = []
    for r in runs:
        hit = at_gain(r["curve"], level)
        if hit is not None:
            rows.append(
                (r["method"], r["seed"], math.log(max(hit["iteration"], 1e-3)), hit["gold"])
            )
    methods = sorted({m for m, *_ in rows})
    seeds = sorted({s for _, s, *_ in rows})
    if baseline not in methods or len(methods) < 2 or len(seeds) < 2:
        return None

    def fit(sample_seeds: Sequence[int]) -> torch.Tensor | None:
        cols, ys = [], []
        for copy, s in enumerate(sample_seeds):
            for m, s2, log_it, gold in rows:
                if s2 != s:
                    continue
                onehot = [float(m == mm) for mm in methods]
                seed_fx = [float(copy == c) for c in range(1, len(sample_seeds))]
                cols.append([*onehot, log_it, *seed_fx])
                ys.append(gold)
        x, y = torch.tensor(cols, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
        present = x[:, : len(methods)].sum(0) > 0
        if not bool(present.all()):
            return None
        beta = _ols(x, y)
        return torch.cat(
            [
                beta[: len(methods)] - beta[methods.index(baseline)],
                beta[len(methods) : len(methods) + 1],
            ]
        )

    point = fit(seeds)
    if point is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(resamples):
        pick = torch.randint(len(seeds), (len(seeds),), generator=gen).tolist()
        est = fit([seeds[i] for i in pick])
        if est is not None:
            draws.append(est)
    boot = torch.stack(draws)
    lo = torch.quantile(boot, 0.025, dim=0)
    hi = torch.quantile(boot, 0.975, dim=0)
    out: dict[str, Any] = {
        m: {"mean": float(point[i]), "lo": float(lo[i]), "hi": float(hi[i])}
        for i, m in enumerate(methods)
        if m != baseline
    }
    out["log_iterations"] = {"mean": float(point[-1]), "lo": float(lo[-1]), "hi": float(hi[-1])}
    out["runs"] = len(rows)
    return out
