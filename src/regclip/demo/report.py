"""The comparison as Markdown: ``python -m regclip.demo.report FOLDER`` writes FOLDER/report.md.

Every number quoted in ``docs/results.md`` comes from these tables: how many runs hack, the
paired gold differences against vanilla at matched proxy gain (same seed and clip scale),
the per-seed gap between the best clip setting of each method and of vanilla, and the
speed-adjusted gold difference (``gold ~ method + log(iterations) + seed``), each with a 95 %
bootstrap interval over seeds.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .analysis import at_gain, frontier_gap, gain_levels, hacks, paired, speed_adjusted

__all__ = ["markdown_report"]


def _ci(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean']:+.{digits}f} [{stat['lo']:+.{digits}f}, {stat['hi']:+.{digits}f}]"


def _baseline(sde: str) -> str:
    return "flow_grpo_dance" if sde == "dance" else "flow_grpo"


def _slices(runs: list[dict[str, Any]]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    """Runs by (kernel, image side, passes): only runs of one slice are compared."""
    out: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        out[(r["sde"], r.get("size", 0), r["passes"])].append(r)
    return out


def markdown_report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [f"# Frontier report ({result.get('device', '?')})", ""]
    lines += [
        "## Does vanilla hack?",
        "",
        "| method | D | clip | passes | lr | runs | gold falls while proxy rises | proxy start -> end | gold start -> end | hack start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[
            (r["method"], str(r["clip_scale"]), r["passes"], r.get("lr", 0), r.get("size", 0))
        ].append(r)
    for (method, scale, passes, lr, size), group in sorted(groups.items()):

        def mean(key: str, at: int, group: list[dict[str, Any]] = group) -> float:
            return sum(r["curve"][at][key] for r in group) / len(group)

        lines.append(
            f"| {method} | {size * size} | {scale} | {passes} | {lr:g} | {len(group)} | {sum(hacks(r) for r in group)} "
            f"| {mean('proxy', 0):.3f} -> {mean('proxy', -1):.3f} | {mean('gold', 0):.3f} -> "
            f"{mean('gold', -1):.3f} | {mean('hack', 0):.3f} -> {mean('hack', -1):.3f} |"
        )
    for (sde, size, passes), group in sorted(_slices(runs).items()):
        levels = gain_levels(group)
        methods = sorted({r["method"] for r in group})
        base = _baseline(sde)
        if base not in methods:
            continue
        lines += [
            "",
            f"## {sde}-SDE, D = {size * size if size else '?'}, {passes} pass(es) per rollout",
            "",
        ]
        lines += [
            f"Proxy-gain levels: {', '.join(f'{v:.3g}' for v in levels)} (a quarter, half and three quarters of the median final gain)."
        ]
        lines += [
            "",
            f"Paired gold difference vs {base} at matched proxy gain (same seed, same clip scale), mean [95 % CI] over seeds; and log of the iteration ratio (negative: faster):",
            "",
        ]
        lines += [
            "| method | "
            + " | ".join(f"gold @ {v:.3g}" for v in levels)
            + f" | log iter ratio @ {levels[1]:.3g} | hack @ {levels[1]:.3g} |",
            "|---" * (len(levels) + 3) + "|",
        ]
        for m in methods:
            if m == base:
                continue
            cells = [paired(group, m, base, v) for v in levels]
            mid = cells[1]
            lines.append(
                f"| {m} | "
                + " | ".join(_ci(c["gold"]) if c else "n/a" for c in cells)
                + f" | {_ci(mid['log_iter_ratio'], 2) if mid else 'n/a'} | {_ci(mid['hack']) if mid else 'n/a'} |"
            )
        lines += [
            "",
            f"Best clip setting per method and seed minus {base}'s best (the frontier's upper envelope):",
            "",
        ]
        lines += [
            "| method | " + " | ".join(f"gold @ {v:.3g}" for v in levels) + " |",
            "|---" * (len(levels) + 1) + "|",
        ]
        for m in methods:
            if m != base:
                cells = [frontier_gap(group, m, base, v) for v in levels]
                lines.append(
                    f"| {m} | " + " | ".join(_ci(c["gold"]) if c else "n/a" for c in cells) + " |"
                )
        lines += [
            "",
            "Speed-adjusted: gold = method + gamma log(iterations) + seed, fitted over every run reaching the level; method minus vanilla:",
            "",
        ]
        lines += [
            "| level | runs | gamma (log iterations) | "
            + " | ".join(m for m in methods if m != base)
            + " |",
            "|---" * (len(methods) + 2) + "|",
        ]
        for v in levels:
            fit = speed_adjusted(group, base, v)
            if fit is None:
                continue
            lines.append(
                f"| {v:.3g} | {fit['runs']} | {_ci(fit['log_iterations'])} | "
                + " | ".join(_ci(fit.get(m)) for m in methods if m != base)
                + " |"
            )
        adaptive = next((m for m in methods if m.startswith("adaptive_guard")), None)
        fixed = adaptive.replace("adaptive_guard", "grpo_guard") if adaptive else None
        if adaptive is not None and fixed is not None and fixed in methods:
            cells = [frontier_gap(group, adaptive, fixed, v) for v in levels]
            lines += [
                "",
                f"{adaptive} (default target, no tuning) minus the best fixed clip of {fixed}, "
                "per seed:",
                "",
                "| " + " | ".join(f"gold @ {v:.3g}" for v in levels) + " |",
                "|---" * len(levels) + "|",
                "| " + " | ".join(_ci(c["gold"]) if c else "n/a" for c in cells) + " |",
            ]
        reach = {
            m: sum(at_gain(r["curve"], levels[-1]) is not None for r in group if r["method"] == m)
            for m in methods
        }
        totals = {m: sum(r["method"] == m for r in group) for m in methods}
        lines += [
            "",
            "Runs reaching the top level: "
            + ", ".join(f"{m} {reach[m]}/{totals[m]}" for m in methods)
            + ".",
        ]
    lines += _ratio_movement(runs)
    return "\n".join(lines) + "\n"


def _ratio_movement(runs: list[dict[str, Any]]) -> list[str]:
    """How far the ratio moved off-policy: the log-ratio's shift in units of its spread
    (``-mean / std``) and the clipped fraction on the second and the last pass, averaged
    over iterations and runs at the calibrated clip range."""
    lines = ["", "## How far the ratio moves (calibrated clip, mean over iterations and runs)", ""]
    lines += [
        "| method | D | passes | shift/std pass 2 | shift/std last pass | clipped pass 2 | clipped last pass |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["clip_scale"] == 1.0 and r["passes"] > 1:
            groups[(r["method"], r.get("size", 0) ** 2, r["passes"])].append(r)
    for (method, dim, passes), group in sorted(groups.items()):

        def mean(key: str, group: list[dict[str, Any]] = group) -> float:
            values = [c[key] for r in group for c in r["curve"] if key in c]
            return sum(values) / len(values) if values else math.nan

        lines.append(
            f"| {method} | {dim} | {passes} | {mean('pass2/log_ratio/shift_z'):+.2f} | {mean('last/log_ratio/shift_z'):+.2f} "
            f"| {mean('pass2/clip/frac'):.2f} | {mean('last/clip/frac'):.2f} |"
        )
    return lines


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    text = markdown_report(json.loads((folder / "frontier.json").read_text()))
    (folder / "report.md").write_text(text)
    print(text)
