"""The comparison as Markdown: ``python -m regclip.demo.report FOLDER`` writes FOLDER/report.md.

Every number quoted in ``docs/results.md`` comes from these tables. Per slice (kernel, latent
size, passes, learning rate): how many runs hack; the primary endpoint, the gap between each
method's speed-gold curve and vanilla's (:func:`regclip.demo.analysis.curve_gap`); each
method at its selected clip setting; gold and hack at a budget, at the checkpoint the proxy
picks; end-of-run gold and hack at the same clip multiple; whether each method's best
setting is interior; and, across latent sizes, the scaling fit. Every interval is a 95 %
bootstrap over replicates.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .analysis import (
    at_gain,
    bootstrap,
    budget_gap,
    curve_gap,
    gain_levels,
    hacks,
    mean_gap,
    replicate_gaps,
    same_scale_gap,
    scaling_fit,
    select_scales,
    selected_gap,
)

__all__ = [
    "SPEED_GRID",
    "baseline_of",
    "markdown_report",
    "reported_runs",
    "scaling_gaps",
    "slice_levels",
    "slices",
]

Run = dict[str, Any]

SPEED_GRID = [k / 4 for k in range(0, 29)]
"""Speeds at which curves are compared: log2 iterations to a level, 0 to 7 (1 to 128)."""

OPENING = (
    "Good looks like this: at the same proxy gain, a method ends with **more gold** (contrast "
    "drawn as the world draws it) and **less hack** (background brightness) than vanilla "
    "Flow-GRPO, at the same speed (iterations to reach that gain). Gold differences below are "
    "method minus vanilla (positive: the method is better); hack differences are method minus "
    "vanilla (negative: the method hacks less)."
)


def _ci(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean']:+.{digits}f} [{stat['lo']:+.{digits}f}, {stat['hi']:+.{digits}f}]"


def baseline_of(sde: str) -> str:
    """Vanilla on the kernel ``sde``."""
    return "flow_grpo_dance" if sde == "dance" else "flow_grpo"


def lr_text(lr: float, group: Sequence[Run]) -> str:
    """A slice's learning rate as text: ``"lr 0.0001"``, or for a slice that pools several
    (key lr 0, :func:`slices`) ``"learning rates 0.0001, 0.0004"``."""
    if lr:
        return f"lr {lr:g}"
    return "learning rates " + ", ".join(sorted({f"{r['lr']:g}" for r in group}))


def slices(runs: Sequence[Run]) -> dict[tuple[str, int, int, float], list[Run]]:
    """Runs by (kernel, image side, passes, lr): only runs of one slice are compared. With one
    pass clipping never acts, so runs at several learning rates form one slice (lr 0): their
    learning rate is the setting along the speed-gold curve."""
    out: dict[tuple[str, int, int, float], list[Run]] = defaultdict(list)
    for r in runs:  # one pass: the learning rate is the speed knob, so its values pool (lr 0)
        lr = 0.0 if r["passes"] == 1 else r.get("lr", 0.0)
        out[(r["sde"], r.get("size", 0), r["passes"], lr)].append(r)
    return out


def slice_levels(result: dict[str, Any], group: Sequence[Run]) -> list[float]:
    """The pre-registered proxy-gain levels of the group's image side (``decisions``), else
    those of the config (``config.levels``), else a quarter, half and three quarters of the
    group's median final gain."""
    size = str(group[0].get("size", 0)) if group else "0"
    decided = result.get("decisions", {}).get("levels", {}).get(size)
    fixed = decided or result.get("config", {}).get("levels")
    return list(fixed) if fixed else gain_levels(group)


def _interior(group: Sequence[Run], method: str, level: float) -> tuple[int, int]:
    """(replicates whose best-gold setting at ``level`` is neither its fastest nor its
    slowest setting that reached the level, replicates with three settings or more)."""
    per_seed: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in group:
        if r["method"] == method and (hit := at_gain(r["curve"], level)) is not None:
            per_seed[r["seed"]].append((hit["iteration"], hit["gold"]))
    inside = total = 0
    for points in per_seed.values():
        if len(points) >= 3:
            total += 1
            points.sort()
            best = max(range(len(points)), key=lambda i: points[i][1])
            inside += 0 < best < len(points) - 1
    return inside, total


def _start(group: Sequence[Run]) -> str:
    golds = {r["seed"]: r["curve"][0]["gold"] for r in group}
    mean = sum(golds.values()) / len(golds)
    return f"{mean:.3f} (replicates {min(golds.values()):.3f} to {max(golds.values()):.3f})"


def _early(group: Sequence[Run], levels: Sequence[float]) -> str:
    cells = []
    for v in levels:
        hits = [at_gain(r["curve"], v) for r in group]
        reached = [h for h in hits if h is not None]
        early = sum(
            h["iteration"] <= r["curve"][1]["iteration"]
            for h, r in zip(hits, group, strict=True)
            if h
        )
        cells.append(
            f"{v:.3g}: {len(reached)}/{len(group)} reach it, {early} before the second evaluation"
        )
    return "; ".join(cells)


def _slice_section(
    result: dict[str, Any], key: tuple[str, int, int, float], group: list[Run]
) -> list[str]:
    sde, size, passes, lr = key
    base = baseline_of(sde)
    methods = sorted({r["method"] for r in group} - {base})
    if base not in {r["method"] for r in group}:
        return []
    levels = slice_levels(result, group)
    mid = levels[len(levels) // 2]
    reps = sorted({r["seed"] for r in group})
    budget = min(r["curve"][-1]["iteration"] for r in group)
    lines = [
        "",
        f"## {sde}-SDE, D = {size * size}, {passes} pass(es) per rollout, {lr_text(lr, group)}",
        "",
        f"- Replicates: {len(reps)} ({', '.join(map(str, reps))}); runs: {len(group)}.",
        f"- Gold at the start: {_start(group)}.",
        f"- Proxy-gain levels: {_early(group, levels)}.",
        "",
        "**Primary: speed-gold curves.** Per replicate, each method's settings give (iterations "
        "to the level, gold there); the gap to vanilla's curve is read where both exist and "
        "averaged over that shared range. Mean [95 % CI over replicates]; `reps` counts "
        "replicates with a shared range.",
        "",
        "| method | "
        + " | ".join(f"gold gap @ {v:.3g}" for v in levels)
        + f" | hack gap @ {mid:.3g} | reps |",
        "|---" * (len(levels) + 3) + "|",
    ]
    for m in methods:
        cells = [curve_gap(group, m, base, v, SPEED_GRID) for v in levels]
        hack = curve_gap(group, m, base, mid, SPEED_GRID, column=2)
        mid_cell = cells[len(levels) // 2]
        lines.append(
            f"| {m} | "
            + " | ".join(_ci(c["summary"]) if c else "n/a" for c in cells)
            + f" | {_ci(hack['summary']) if hack else 'n/a'} | {mid_cell['replicates'] if mid_cell else 0} |"
        )
    lines += _by_speed(group, methods, base, mid)
    selected = result.get("decisions", {}).get("selected", {}).get(f"{sde}/{size}/{passes}/{lr:g}")
    if selected is None:
        selected = select_scales(group, mid)
        source = "chosen on these same replicates: an exploratory reading, not a confirmatory one"
    else:
        source = "chosen on the exploration replicates and fixed in the pre-registration"
    lines += [
        "",
        f"**Selected setting** ({source}): gold at proxy gain {mid:.3g}, method at its setting "
        f"minus {base} at its own ({selected.get(base, 'n/a')}); log2 of the iteration ratio "
        "(negative: the method is faster).",
        "",
        "| method | setting | gold | hack | log2 iteration ratio |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        cell = selected_gap(group, m, base, selected, mid)
        lines.append(
            f"| {m} | {selected.get(m, 'n/a')} | {_ci(cell['gold']) if cell else 'n/a'} | "
            f"{_ci(cell['hack']) if cell else 'n/a'} | {_ci(cell['log2_iter_ratio'], 2) if cell else 'n/a'} |"
        )
    lines += [
        "",
        f"**Budget of {budget} iterations, checkpoint picked by the proxy** (what a user who "
        "cannot see the gold keeps): left, clip setting and checkpoint both picked by the "
        "proxy; right, at the calibrated clip (x1).",
        "",
        "| method | gold (proxy-tuned) | hack (proxy-tuned) | gold at x1 | hack at x1 |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        tuned, at_one = budget_gap(group, m, base, budget), budget_gap(group, m, base, budget, "1")
        lines.append(
            f"| {m} | {_ci(tuned['gold']) if tuned else 'n/a'} | {_ci(tuned['hack']) if tuned else 'n/a'} "
            f"| {_ci(at_one['gold']) if at_one else 'n/a'} | {_ci(at_one['hack']) if at_one else 'n/a'} |"
        )
    lines += [
        "",
        "**End of run at the same clip multiple** (not speed-matched): pooled over the "
        "multiples both ran, then per multiple (gold / hack).",
        "",
        "| method | gold | hack | per multiple |",
        "|---|---|---|---|",
    ]
    for m in methods:
        same = same_scale_gap(group, m, base)
        if same is None:
            lines.append(f"| {m} | n/a | n/a | |")
            continue
        per = "; ".join(
            f"{k}: {_ci(v['gold'], 2)} / {_ci(v['hack'], 2)}" for k, v in same["by_scale"].items()
        )
        lines.append(f"| {m} | {_ci(same['gold'])} | {_ci(same['hack'])} | {per} |")
    lines += [
        "",
        f"**Is the frontier closed?** Replicates whose best-gold setting at {mid:.3g} is interior:",
        "",
    ]
    lines.append(
        ", ".join(f"{m} {i}/{t}" for m in [base, *methods] for i, t in [_interior(group, m, mid)])
        + "."
    )
    return lines


def _by_speed(group: Sequence[Run], methods: Sequence[str], base: str, level: float) -> list[str]:
    """Where each curve lies above or below vanilla's, by speed."""
    lines = [
        "",
        f"Gold gap by speed at proxy gain {level:.3g} (iterations to the level; replicates covering it):",
        "",
    ]
    for m in methods:
        gap = curve_gap(group, m, base, level, SPEED_GRID)
        if gap is None:
            continue
        cells = gap["by_speed"]
        above = [c for c in cells if c["lo"] > 0]
        below = [c for c in cells if c["hi"] < 0]
        lines.append(
            f"- {m}: above vanilla at {_span(above, len(cells))}; "
            f"below at {_span(below, len(cells))}; {len(cells)} speeds covered."
        )
    return lines


def _span(cells: list[dict[str, float]], total: int) -> str:
    """The iteration range of ``cells`` (grid speeds) and how many of ``total`` they are."""
    if not cells:
        return "no speed"
    its = [2 ** c["log2_iterations"] for c in cells]
    return f"{min(its):.1f} to {max(its):.1f} iterations ({len(cells)} of {total} speeds)"


def scaling_gaps(result: dict[str, Any]) -> dict[int, dict[Any, float]]:
    """D -> per-replicate primary gap (GRPO-Guard minus vanilla along the speed-gold curves
    at the middle level), over the Flow-SDE, 4-pass slices at the lowest lr of each D."""
    gaps: dict[int, dict[Any, float]] = {}
    lowest: dict[int, float] = {}
    for (sde, size, passes, lr), group in slices(result["runs"]).items():
        methods = {r["method"] for r in group}
        if sde != "flow" or passes != 4 or not {"grpo_guard", "flow_grpo"} <= methods:
            continue
        if size * size in lowest and lowest[size * size] <= lr:
            continue
        levels = slice_levels(result, group)
        per = replicate_gaps(group, "grpo_guard", "flow_grpo", levels[len(levels) // 2], SPEED_GRID)
        if len(per) >= 2:
            gaps[size * size], lowest[size * size] = mean_gap(per), lr
    return gaps


def _scaling(result: dict[str, Any]) -> list[str]:
    """The primary gap against latent size, and the line through it."""
    gaps = scaling_gaps(result)
    if len(gaps) < 2:
        return []
    fit = scaling_fit(gaps, 65536)
    shifts: dict[int, float] = {}
    for d in gaps:
        values = [c["last/log_ratio/shift_z"] for r in result["runs"]
                  if r["method"] == "flow_grpo" and r.get("size", 0) ** 2 == d and r["passes"] == 4
                  for c in r["curve"] if "last/log_ratio/shift_z" in c]  # fmt: skip
        shifts[d] = sum(values) / len(values) if values else math.nan
    lines = [
        "",
        "## Scaling with latent size (Flow-SDE, 4 passes)",
        "",
        "| D | GRPO-Guard gap (primary, middle level) | replicates | vanilla log-ratio shift/std, last pass |",
        "|---|---|---|---|",
    ]
    for d in sorted(gaps):
        lines.append(f"| {d} | {_ci(bootstrap(gaps[d]))} | {len(gaps[d])} | {shifts[d]:+.3f} |")
    lines += [
        "",
        f"Line through the per-D means: gap = a + b log2 D, b = {_ci(fit['slope'])} per doubling; "
        f"predicted at D = 65536: {_ci(fit['prediction'])} (an extrapolation of "
        f"{math.log2(65536) - math.log2(max(gaps)):.0f} doublings beyond the largest D run).",
    ]
    return lines


def _hacking(runs: Sequence[Run]) -> list[str]:
    lines = [
        "## Does vanilla hack?",
        "",
        "| method | D | setting | passes | lr | runs | gold falls while proxy rises | proxy start -> end | gold start -> end | hack start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[
            (
                r["method"],
                r.get("size", 0) ** 2,
                r.get("setting", str(r["clip_scale"])),
                r["passes"],
                r.get("lr", 0),
            )
        ].append(r)
    for (method, dim, setting, passes, lr), group in sorted(groups.items(), key=str):

        def mean(key: str, at: int, group: list[Run] = group) -> float:
            return sum(r["curve"][at][key] for r in group) / len(group)

        lines.append(
            f"| {method} | {dim} | {setting} | {passes} | {lr:g} | {len(group)} | {sum(hacks(r) for r in group)} "
            f"| {mean('proxy', 0):.3f} -> {mean('proxy', -1):.3f} | {mean('gold', 0):.3f} -> "
            f"{mean('gold', -1):.3f} | {mean('hack', 0):.3f} -> {mean('hack', -1):.3f} |"
        )
    return lines


def reported_runs(result: dict[str, Any]) -> list[Run]:
    """The confirmation runs when there are any (exploration runs only chose the levels and
    settings), else every run."""
    confirmed = [r for r in result["runs"] if r.get("phase") == "confirmation"]
    return confirmed or list(result["runs"])


def markdown_report(result: dict[str, Any]) -> str:
    runs = reported_runs(result)
    phases = sorted({r.get("phase", "?") for r in runs})
    explored = len(result["runs"]) - len(runs)
    lines = [
        f"# Frontier report ({result.get('device', '?')})",
        "",
        OPENING,
        "",
        f"Every table below reads the {', '.join(phases)} runs only ({len(runs)} runs)"
        + (
            f"; {explored} exploration runs set the levels and the selected settings."
            if explored
            else "."
        ),
        "",
    ]
    lines += _hacking(runs)
    for key, group in sorted(slices(runs).items()):
        lines += _slice_section(result, key, group)
    lines += _scaling(dict(result, runs=runs))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    text = markdown_report(json.loads((folder / "frontier.json").read_text()))
    (folder / "report.md").write_text(text)
    print(text)
