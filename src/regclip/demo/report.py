"""Markdown tables from an ``overopt.json``: ``python -m regclip.demo.report FOLDER``.

Every number quoted in ``docs/results.md`` comes from these tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["format_table", "markdown_report"]

COLUMNS = ("gold_acc", "nn_dist", "diversity", "drift", "kl")


def _cell(stat: dict[str, float] | None) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat else "n/a"


def _endpoints(entry: dict[str, Any], metric: str) -> tuple[float, float]:
    last = max(e["step"] for e in entry["eval"])
    first = [e[metric] for e in entry["eval"] if e["step"] == 0]
    end = [e[metric] for e in entry["eval"] if e["step"] == last]
    return sum(first) / len(first), sum(end) / len(end)


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text table for the terminal: proxy start -> end and gold at matched proxy."""
    matched = summary.get("matched", {}).get("proxy", {})
    levels = matched.get("levels", [])
    head = f"{'method':24s} {'proxy 0->end':>14s} " + " ".join(f"{c:>16s}" for c in COLUMNS)
    title = (
        f"gold metrics at matched proxy {levels[-1]:.2f} (mean ± std over seeds)"
        if levels
        else "no common proxy gain to match"
    )
    lines = [title, head, "-" * len(head)]
    for name, entry in summary["methods"].items():
        start, end = _endpoints(entry, "proxy")
        cells = [_cell(matched["at"][name][c][-1]) if levels else "n/a" for c in COLUMNS]
        lines.append(
            f"{name:24s} {f'{start:5.2f}->{end:5.2f}':>14s} " + " ".join(f"{c:>16s}" for c in cells)
        )
    return "\n".join(lines)


def _matched_table(summary: dict[str, Any], axis: str) -> list[str]:
    matched = summary.get("matched", {}).get(axis, {})
    levels = matched.get("levels", [])
    if not levels:
        return [f"No common {axis} level to match."]
    metrics = [m for m in ("proxy", *COLUMNS) if m != axis]
    lines = []
    for index, level in enumerate(levels):
        if matched["fractions"][index] not in (0.5, 1.0):
            continue
        lines += [
            f"\nAt {axis} = {level:.3g} ({matched['fractions'][index]:.0%} of the "
            f"gain every compared run reached):\n",
            "| method | seeds | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 2) + "|",
        ]
        for name, table in matched["at"].items():
            seeds = len(summary["methods"][name]["seeds"])
            reached = max((table[m][index] or {}).get("n", 0) for m in metrics)
            count = str(seeds) if reached == seeds else f"{reached} of {seeds}"
            cells = [_cell(table[m][index]) for m in metrics]
            lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
    return lines


def _ratio_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| method | clip eps | vanilla 1-mean (first / last step) | vanilla std (first / "
        "last) | own 1-mean max abs | own std (first / last) | A>0 clipped (last step) "
        "| A<0 clipped (last step) | clip frac range over steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["methods"].items():
        r, c = entry["ratio_by_timestep"], entry["clip_by_timestep"]
        own_shift = max(abs(1 - m) for m in r["mean"])
        lines.append(
            f"| {name} | {entry['clip_range']:.2e} | {1 - r['raw_mean'][0]:.1e} / "
            f"{1 - r['raw_mean'][-1]:.1e} | {r['raw_std'][0]:.1e} / {r['raw_std'][-1]:.1e} | "
            f"{own_shift:.1e} | {r['std'][0]:.1e} / {r['std'][-1]:.1e} | "
            f"{c['pos_high'][-1]:.2f} | {c['neg_low'][-1]:.2f} | "
            f"{min(c['frac']):.2f}-{max(c['frac']):.2f} |"
        )
    return lines


def _sweep_table(summary: dict[str, Any]) -> list[str]:
    if not summary.get("clip_sweep"):
        return ["No clip or KL sweep in this run."]
    lines = [
        "| method | clip target | clip eps | KL coef | proxy start -> end | nn_dist end | "
        "diversity end | drift end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in summary["clip_sweep"].items():
        for run in runs:
            rows = sorted(run["eval"], key=lambda e: e["step"])
            first, last = rows[0], rows[-1]
            lines.append(
                f"| {name} | {run['clip_target']:.0%} | {run['clip_range']:.2e} | "
                f"{run['kl_coef'] if name.endswith('_kl') else '-'} | "
                f"{first['proxy']:.1f} -> {last['proxy']:.1f} | "
                f"{last['nn_dist']:.3f} | {last['diversity']:.3f} | {last['drift']:.3f} |"
            )
    return lines


def markdown_report(summary: dict[str, Any]) -> str:
    """The tables of ``docs/results.md`` for one summary."""
    cfg = summary["config"]
    out = [
        f"Device: {summary['device']}; D = {cfg['size']}^2 = {cfg['size'] ** 2}; "
        f"{cfg['steps']} GRPO iterations x {cfg['passes']} passes, groups of "
        f"{cfg['group_size']} per class, lr {cfg['lr']}, {cfg['num_steps']} sampling steps.",
        "",
        "Start -> end (mean over seeds):",
        "",
        "| method | seeds | proxy | gold_acc | nn_dist | diversity | drift | kl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["methods"].items():
        cells = []
        for metric in ("proxy", *COLUMNS):
            start, end = _endpoints(entry, metric)
            cells.append(f"{start:.3g} -> {end:.3g}")
        out.append(f"| {name} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    out += ["", "### At matched proxy reward (KL baselines excluded from setting the levels)"]
    out += _matched_table(summary, "proxy")
    out += ["", "### At matched KL to the pretrained model"]
    out += _matched_table(summary, "kl")
    out += ["", "### Ratio and clipping per timestep (optimizer passes >= 2)", ""]
    out += _ratio_table(summary)
    out += ["", "### Clip-range and KL sweeps (seed 0)", ""]
    out += _sweep_table(summary)
    if "left_shift_vs_dim" in summary:
        shift = summary["left_shift_vs_dim"]
        out += [
            "",
            "### Left shift against D at fixed drift",
            "",
            "| D | measured (1 - mean rho) / std rho, mean over steps | predicted |",
            "|---|---|---|",
        ]
        for dim, measured, predicted in zip(
            shift["dims"], shift["measured"], shift["predicted"], strict=True
        ):
            out.append(
                f"| {dim} | {sum(measured) / len(measured):.4f} | "
                f"{sum(predicted) / len(predicted):.4f} |"
            )
        out.append(f"\nFitted exponent: {shift['fitted_exponent']:.3f} (sqrt(D) law: 0.5).")
    if summary.get("skipped"):
        out += ["", f"Skipped for time: {', '.join(summary['skipped'])}."]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_report(json.loads((Path(sys.argv[1]) / "overopt.json").read_text())))
