r"""Frontier analysis: every endpoint of the confirmatory experiment, with intervals over
replicates.

A *run* is one entry of ``frontier.json``'s ``runs``: ``method``, ``clip_scale``, ``seed``,
``passes``, ``size`` and ``curve`` (records of ``iteration``, ``proxy``, ``gold``, ``hack``).
A *replicate* is a seed: it owns its pretrained generator, its proxy rater and its GRPO noise,
so it is the unit every interval resamples; a run never is. Proxy *gain* is the proxy minus
the run's own value at iteration 0.

- :func:`at_gain` reads a curve where the gain first reaches a level: gold, hack and the
  (fractional) iterations it took, the run's *speed*; linear between the two evaluations
  around the crossing.
- :func:`curve_gap` is the primary endpoint. Per replicate, each method's clip settings give
  points (log2 iterations to the level, gold there); joined in order of speed they form the
  method's *speed-gold curve*, defined only between its fastest and its slowest setting. The
  gap to the baseline's curve is taken on a grid of speeds where both curves exist (never
  extrapolated), and summarised per replicate by its mean over that shared range.
- :func:`selected_gap`: each method at the clip setting chosen on other (exploration)
  replicates, minus the baseline at its chosen setting.
- :func:`budget_gap`: gold and hack at a budget of iterations, at the checkpoint (and clip
  setting) a user who sees only the proxy would keep.
- :func:`same_scale_gap`: end-of-run gold and hack at the same clip multiple.
- :func:`scaling_fit`: the primary gap against ``log2 D``, a line through the per-D means,
  with its prediction at another D.

Every interval is a 95 % percentile bootstrap over replicates (:func:`bootstrap`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "at_gain",
    "bootstrap",
    "budget_gap",
    "curve_gap",
    "decide",
    "gain_levels",
    "hacks",
    "interpolate",
    "mean_gap",
    "replicate_gaps",
    "same_scale_gap",
    "scaling_fit",
    "select_scales",
    "selected_gap",
    "slice_key",
    "speed_gold_points",
]

Run = dict[str, Any]
Interval = dict[str, float]

RESAMPLES = 4000
"""Bootstrap resamples of every interval."""


def at_gain(curve: Sequence[dict[str, float]], level: float) -> dict[str, float] | None:
    """``iteration``, ``gold``, ``hack`` where the proxy gain first reaches ``level`` > 0,
    linear between the evaluations before and at the crossing; None if it never does.

    With gains ``g0 < level <= g1`` at iterations ``i0, i1`` the weight of the later record
    is ``w = (level - g0) / (g1 - g0)``."""
    if level <= 0:
        return None
    start = curve[0]["proxy"]
    prev = curve[0]
    for row in curve[1:]:
        gain, prev_gain = row["proxy"] - start, prev["proxy"] - start
        if gain >= level:
            w = (level - prev_gain) / (gain - prev_gain)
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


def bootstrap(
    per_replicate: dict[Any, Any],
    statistic: Callable[[list[Any]], float] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Estimate and 95 % percentile-bootstrap interval of ``statistic`` over replicates.

    ``per_replicate`` maps a replicate to its value (anything ``statistic`` reads);
    ``statistic`` takes a list of values, default their mean. Each resample draws as many
    replicates as there are, with replacement. Returns ``mean`` (the estimate on the data),
    ``lo``, ``hi`` and ``n`` (replicates)."""
    values = list(per_replicate.values())
    stat = statistic or (lambda v: sum(v) / len(v))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (resamples, len(values)), generator=gen).tolist()
    draws = [stat([values[i] for i in row]) for row in idx]
    finite = torch.tensor([d for d in draws if math.isfinite(d)], dtype=torch.float64)
    lo, hi = torch.quantile(finite, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(stat(values)), "lo": lo, "hi": hi, "n": len(values)}


def _by_replicate(runs: Sequence[Run], method: str) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = defaultdict(list)
    for r in runs:
        if r["method"] == method:
            out[r["seed"]].append(r)
    return out


def speed_gold_points(runs: Sequence[Run], level: float) -> list[tuple[float, float, float]]:
    """(log2 iterations, gold, hack) at proxy gain ``level`` of each run that reaches it,
    sorted by speed."""
    hits = [at_gain(r["curve"], level) for r in runs]
    points = [(math.log2(h["iteration"]), h["gold"], h["hack"]) for h in hits if h is not None]
    return sorted(points)


def interpolate(points: Sequence[tuple[float, ...]], x: float, column: int = 1) -> float:
    """The piecewise-linear curve through ``points`` (sorted by their first element) read at
    ``x``; NaN outside ``[points[0][0], points[-1][0]]``. Points at one speed are averaged."""
    merged: dict[float, list[float]] = defaultdict(list)
    for p in points:
        merged[p[0]].append(p[column])
    xs = sorted(merged)
    ys = [sum(merged[v]) / len(merged[v]) for v in xs]
    if not xs or x < xs[0] or x > xs[-1]:
        return math.nan
    for k in range(1, len(xs)):
        if x <= xs[k]:
            w = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
            return ys[k - 1] + w * (ys[k] - ys[k - 1])
    return ys[-1]


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def replicate_gaps(
    runs: Sequence[Run],
    method: str,
    baseline: str,
    level: float,
    grid: Sequence[float],
    column: int = 1,
) -> dict[int, list[float]]:
    """Per replicate, ``method``'s speed-gold curve minus ``baseline``'s at each speed of
    ``grid`` (NaN where either curve does not exist); replicates with no shared speed are
    left out."""
    mine, theirs = _by_replicate(runs, method), _by_replicate(runs, baseline)
    gaps: dict[int, list[float]] = {}
    for seed in sorted(set(mine) & set(theirs)):
        a, b = speed_gold_points(mine[seed], level), speed_gold_points(theirs[seed], level)
        row = [interpolate(a, x, column) - interpolate(b, x, column) for x in grid]
        if any(not math.isnan(v) for v in row):
            gaps[seed] = row
    return gaps


def mean_gap(gaps: dict[int, list[float]]) -> dict[int, float]:
    """Each replicate's gap averaged over its shared speed range (the primary summary)."""
    return {s: _nanmean(g) for s, g in gaps.items()}


def curve_gap(
    runs: Sequence[Run],
    method: str,
    baseline: str,
    level: float,
    grid: Sequence[float],
    column: int = 1,
    min_coverage: float = 0.5,
) -> dict[str, Any] | None:
    """Gold (``column`` 1; hack: 2) of ``method``'s speed-gold curve minus ``baseline``'s, per
    replicate, at each speed of ``grid`` (log2 iterations) where both curves exist.

    Returns ``summary``: the per-replicate mean gap over its shared speed range,
    bootstrapped; ``by_speed``: per grid speed the mean gap over the replicates covering it
    and its interval (only speeds covered by at least ``min_coverage`` of the replicates);
    ``replicates``: how many replicates have a shared range. None with fewer than two."""
    gaps = replicate_gaps(runs, method, baseline, level, grid, column)
    if len(gaps) < 2:
        return None
    summary = bootstrap(mean_gap(gaps))
    by_speed = []
    for k, x in enumerate(grid):
        covered = {s: g[k] for s, g in gaps.items() if not math.isnan(g[k])}
        if len(covered) >= max(2, min_coverage * len(gaps)):
            by_speed.append({"log2_iterations": x, **bootstrap(covered)})
    return {"summary": summary, "by_speed": by_speed, "replicates": len(gaps)}


def _setting(run: Run) -> str:
    """A run's setting as text (``"0.25"``, ``"none"``, ``"target 0.15"``, ``"kl 0.02"``)."""
    if "setting" in run:
        return str(run["setting"])
    return "none" if run["clip_scale"] is None else f"{run['clip_scale']:g}"


def select_scales(runs: Sequence[Run], level: float) -> dict[str, str]:
    """Per method, the setting (as ``frontier.json`` writes it) with the highest mean gold at proxy
    gain ``level`` over the replicates of ``runs``, among settings that reach the level in
    more than half of them: the choice made on exploration replicates."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    replicates: dict[str, set[int]] = defaultdict(set)
    for r in runs:
        replicates[r["method"]].add(r["seed"])
        hit = at_gain(r["curve"], level)
        if hit is not None:
            cells[(r["method"], _setting(r))].append(hit["gold"])
    best: dict[str, tuple[float, str]] = {}
    for (method, scale), golds in cells.items():
        if len(golds) * 2 > len(replicates[method]):
            mean = sum(golds) / len(golds)
            if method not in best or mean > best[method][0]:
                best[method] = (mean, scale)
    return {m: s for m, (_, s) in best.items()}


def _run_at(runs: Sequence[Run], method: str, scale: str) -> dict[int, Run]:
    return {r["seed"]: r for r in runs if r["method"] == method and _setting(r) == scale}


def selected_gap(
    runs: Sequence[Run], method: str, baseline: str, scales: dict[str, str], level: float
) -> dict[str, Any] | None:
    """Gold, hack and log2 iterations at proxy gain ``level``: ``method`` at its selected
    clip setting ``scales[method]`` minus ``baseline`` at ``scales[baseline]``, paired by
    replicate (replicates where both reach the level)."""
    if method not in scales or baseline not in scales:
        return None
    mine, theirs = _run_at(runs, method, scales[method]), _run_at(runs, baseline, scales[baseline])
    diffs: dict[int, tuple[float, float, float]] = {}
    for seed in sorted(set(mine) & set(theirs)):
        a, b = at_gain(mine[seed]["curve"], level), at_gain(theirs[seed]["curve"], level)
        if a is not None and b is not None:
            diffs[seed] = (
                a["gold"] - b["gold"],
                a["hack"] - b["hack"],
                math.log2(a["iteration"] / b["iteration"]),
            )
    if len(diffs) < 2:
        return None
    return {
        key: bootstrap({s: d[i] for s, d in diffs.items()})
        for i, key in enumerate(("gold", "hack", "log2_iter_ratio"))
    }


def _proxy_pick(run: Run, budget: int) -> dict[str, float]:
    """The record with the highest proxy among evaluations at iterations <= ``budget``."""
    rows = [c for c in run["curve"] if c["iteration"] <= budget]
    return max(rows, key=lambda c: c["proxy"])


def budget_gap(
    runs: Sequence[Run], method: str, baseline: str, budget: int, scale: str | None = None
) -> dict[str, Any] | None:
    """Gold and hack of the checkpoint a user who sees only the proxy would keep after
    ``budget`` iterations, ``method`` minus ``baseline`` per replicate.

    With ``scale`` (a clip setting as in ``frontier.json``, e.g. ``"0.25"`` or ``"none"``)
    both run at that multiple and the checkpoint is the proxy's best evaluation; without
    it the clip setting is picked by the proxy too (the best evaluation over every setting)."""

    def picks(name: str) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for seed, group in _by_replicate(runs, name).items():
            pool = [r for r in group if scale is None or _setting(r) == scale]
            if pool:
                out[seed] = max((_proxy_pick(r, budget) for r in pool), key=lambda c: c["proxy"])
        return out

    mine, theirs = picks(method), picks(baseline)
    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    return {
        key: bootstrap({s: mine[s][key] - theirs[s][key] for s in seeds})
        for key in ("gold", "hack", "proxy")
    }


def same_scale_gap(runs: Sequence[Run], method: str, baseline: str) -> dict[str, Any] | None:
    """End-of-run gold and hack, ``method`` minus ``baseline`` at the same clip multiple,
    averaged over the multiples both ran within each replicate; also per multiple."""
    mine, theirs = _by_replicate(runs, method), _by_replicate(runs, baseline)
    pooled: dict[int, list[tuple[float, float]]] = defaultdict(list)
    per_scale: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for seed in sorted(set(mine) & set(theirs)):
        other = {_setting(r): r for r in theirs[seed]}
        for r in mine[seed]:
            key = _setting(r)
            if key in other:
                a, b = r["curve"][-1], other[key]["curve"][-1]
                diff = (a["gold"] - b["gold"], a["hack"] - b["hack"])
                pooled[seed].append(diff)
                per_scale[key][seed] = diff
    if len(pooled) < 2:
        return None

    def interval(cells: dict[int, list[tuple[float, float]]], i: int) -> Interval:
        return bootstrap({s: sum(d[i] for d in v) / len(v) for s, v in cells.items()})

    return {
        "gold": interval(pooled, 0),
        "hack": interval(pooled, 1),
        "by_scale": {
            key: {"gold": interval(singles, 0), "hack": interval(singles, 1)}
            for key, cells in sorted(per_scale.items())
            if len(cells) >= 2
            for singles in [{s: [d] for s, d in cells.items()}]
        },
    }


def slice_key(run: Run) -> str:
    """``"sde/size/passes/lr"``: runs are compared only within one slice."""
    return f"{run['sde']}/{run.get('size', 0)}/{run['passes']}/{run.get('lr', 0.0):g}"


def decide(runs: Sequence[Run], fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> dict[str, Any]:
    """The pre-registered rule that turns exploration runs into the confirmation's choices.

    ``levels``: per image side, ``fractions`` of the median final proxy gain over the
    Flow-SDE, 4-pass runs at that side (every method and setting), rounded to 4 digits.
    ``selected``: per slice (:func:`slice_key`), each method's setting with the highest mean
    gold at the middle level of its side (:func:`select_scales`)."""
    sizes = sorted({r.get("size", 0) for r in runs})
    levels: dict[str, list[float]] = {}
    for size in sizes:
        pool = [
            r for r in runs if r.get("size", 0) == size and r["sde"] == "flow" and r["passes"] == 4
        ]
        if pool:
            levels[str(size)] = gain_levels(pool, fractions)
    selected: dict[str, dict[str, str]] = {}
    for key in sorted({slice_key(r) for r in runs}):
        size = key.split("/")[1]
        if size in levels:
            group = [r for r in runs if slice_key(r) == key]
            mids = levels[size]
            selected[key] = select_scales(group, mids[len(mids) // 2])
    return {"levels": levels, "selected": selected}


def scaling_fit(
    gaps: dict[int, dict[Any, float]], predict_at: int, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """Least-squares line ``gap = a + b log2 D`` through the per-D mean gaps.

    ``gaps`` maps D to its replicates' gaps (each D has its own replicates). Each bootstrap
    resample redraws the replicates within every D. Returns the ``slope`` b (gap per
    doubling of D), the ``intercept`` a, and ``prediction`` at D = ``predict_at``, each with
    its interval, and ``means`` per D."""
    dims = sorted(gaps)
    if len(dims) < 2:
        raise ValueError("scaling_fit needs gaps at two latent sizes or more")
    x = torch.tensor([math.log2(d) for d in dims], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)

    def fit(means: list[float]) -> tuple[float, float, float]:
        y = torch.tensor(means, dtype=torch.float64)
        a, b = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
        return a, b, a + b * math.log2(predict_at)

    values = {d: list(gaps[d].values()) for d in dims}
    point = fit([sum(v) / len(v) for v in values.values()])
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(resamples):
        means = []
        for d in dims:
            v = values[d]
            idx = torch.randint(len(v), (len(v),), generator=gen).tolist()
            means.append(sum(v[i] for i in idx) / len(v))
        draws.append(fit(means))
    boot = torch.tensor(draws, dtype=torch.float64)
    lo = torch.quantile(boot, 0.025, dim=0).tolist()
    hi = torch.quantile(boot, 0.975, dim=0).tolist()
    names = ("intercept", "slope", "prediction")
    return {
        **{n: {"mean": point[i], "lo": lo[i], "hi": hi[i]} for i, n in enumerate(names)},
        "means": {d: sum(v) / len(v) for d, v in values.items()},
        "predict_at": predict_at,
    }
