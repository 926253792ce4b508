"""Figures from ``frontier.json`` and ``samples.pt`` (matplotlib, the ``demo`` extra).

``python -m regclip.demo.plots FOLDER`` writes into FOLDER:

* ``frontier.png``: gold against proxy gain per method and clip setting (mean over seeds),
  one panel per kernel and number of passes: higher is better at every proxy gain;
* ``speed.png``: left, iterations to reach each proxy gain; right, gold at the middle gain
  against iterations to reach it, one point per run (speed and method side by side);
* ``hacking.png``: proxy, gold and hack (background brightness) against iterations for the
  vanilla runs at their calibrated clip range, one line per seed;
* ``clip_by_step.png``: clip fraction per sampling step (second pass) per method;
* ``samples.png``: seed-0 samples per method at the start and at the end.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from .analysis import at_gain, gain_levels

__all__ = ["write_plots"]

STYLES = {0.25: ":", 1.0: "-", 4.0: "--", None: "-."}


def _colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _label(scale: float | None) -> str:
    return "no clip" if scale is None else f"clip x{scale:g}"


def _mean_at(runs: list[dict[str, Any]], level: float, key: str, relative: bool) -> float | None:
    """Mean of ``key`` over runs where each first reaches proxy gain ``level`` (minus the
    run's start value if ``relative``); None unless every run reaches it."""
    values = []
    for r in runs:
        hit = at_gain(r["curve"], level)
        if hit is None:
            return None
        values.append(hit[key] - (r["curve"][0][key] if relative else 0.0))
    return sum(values) / len(values)


def _mean_curve(
    runs: list[dict[str, Any]], grid: list[float], key: str = "gold", relative: bool = True
) -> tuple[list[float], list[float]]:
    """(levels, mean ``key`` at each) over the levels of ``grid`` that every run reaches."""
    points = [(level, _mean_at(runs, level, key, relative)) for level in grid]
    kept = [(x, y) for x, y in points if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def _slice(run: dict[str, Any]) -> tuple[str, int, int]:
    """(kernel, image side, passes): runs are compared only within a slice."""
    return run["sde"], run.get("size", 0), run["passes"]


def _main_slice(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the slice with the most runs (the clip-range frontier)."""
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    for r in runs:
        counts[_slice(r)] += 1
    top = max(counts, key=lambda k: counts[k])
    return [r for r in runs if _slice(r) == top]


def _plot_arm(
    ax: Any, xs: list[float], ys: list[float], method: str, scale: Any, colors: dict[str, Any]
) -> None:
    """One (method, clip setting) line: colour per method, line style per clip setting."""
    if xs:
        ax.plot(
            xs, ys, STYLES.get(scale, "-"), color=colors[method], label=f"{method} {_label(scale)}"
        )


def _frontier(runs: list[dict[str, Any]], path: Path) -> None:
    panels = sorted({_slice(r) for r in runs})
    methods = sorted({r["method"] for r in runs})
    colors = _colors(methods)
    top = max(r["curve"][-1]["proxy"] - r["curve"][0]["proxy"] for r in runs)
    grid = [top * i / 40 for i in range(1, 41)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (sde, size, passes) in zip(axes.flat, panels, strict=False):
        groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            if _slice(r) == (sde, size, passes):
                groups[(r["method"], r["clip_scale"])].append(r)
        for (method, scale), group in sorted(
            groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))
        ):
            _plot_arm(ax, *_mean_curve(group, grid), method, scale, colors)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("proxy gain (rater's contrast, minus its value at the start)")
        ax.set_ylabel("gold change from the start (contrast - residual)")
        ax.set_title(f"{sde}-SDE, D = {size * size}, {passes} pass(es) per rollout", fontsize=9)
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _speed(runs: list[dict[str, Any]], path: Path) -> None:
    runs = _main_slice(runs)
    methods = sorted({r["method"] for r in runs})
    colors = _colors(methods)
    levels = gain_levels(runs, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8))
    middle = gain_levels(runs)[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        for scale in sorted({r["clip_scale"] for r in mine}, key=str):
            group = [r for r in mine if r["clip_scale"] == scale]
            curve = _mean_curve(group, levels, key="iteration", relative=False)
            _plot_arm(left, *curve, method, scale, colors)
        pts = [
            (h["iteration"], h["gold"] - r["curve"][0]["gold"])
            for r in mine
            if (h := at_gain(r["curve"], middle))
        ]
        if pts:
            right.scatter(*zip(*pts, strict=True), s=12, color=colors[method], label=method)
    left.set_xlabel("proxy gain")
    left.set_ylabel("iterations to reach it (mean over seeds)")
    left.legend(fontsize=6, ncol=2)
    right.set_xscale("log")
    right.set_xlabel(f"iterations to reach proxy gain {middle:.3g} (log)")
    right.set_ylabel("gold change at that gain")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _hacking(runs: list[dict[str, Any]], path: Path) -> None:
    vanilla = [
        r
        for r in _main_slice(runs)
        if r["method"] in ("flow_grpo", "flow_grpo_dance") and r["clip_scale"] == 1.0
    ]
    if not vanilla:
        return
    keys = (
        ("proxy", "proxy (rater)"),
        ("gold", "gold (exact fit)"),
        ("hack", "hack: background brightness"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, keys, strict=True):
        for r in vanilla:
            ax.plot(
                [c["iteration"] for c in r["curve"]],
                [c[key] for c in r["curve"]],
                lw=1,
                label=f"{r['method']} seed {r['seed']}, {r['passes']} passes",
            )
        ax.set_xlabel("GRPO iteration")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6)
    fig.suptitle(
        "vanilla at its calibrated clip range (one line per seed): the proxy rises, the gold falls"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _clip_by_step(runs: list[dict[str, Any]], path: Path) -> None:
    runs = _main_slice(runs)
    methods = sorted({r["method"] for r in runs})
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        group = [
            r["clip_by_step"]
            for r in runs
            if r["method"] == method
            and r["clip_by_step"]
            and (r["clip_scale"] == 1.0 or "final_ranges" in r)
        ]
        if group:
            mean = torch.tensor(group).mean(0).tolist()
            ax.plot(range(len(mean)), mean, "o-", color=colors[method], label=method, ms=3)
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("fraction of samples clipped (pass 2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


SAMPLE_ROWS = ("flow_grpo", "flow_grpo_kl", "grpo_guard", "ratio_norm", "velocity_guard",
               "adaptive_guard", "kl_mask")  # fmt: skip
"""Methods shown in ``samples.png`` (4 passes; calibrated clip, adaptive ranges)."""


def _samples(samples: dict[str, torch.Tensor], path: Path) -> None:
    def key(method: str) -> str:
        return f"{method}|{None if method == 'adaptive_guard' else 1.0}|4"

    methods = [m for m in SAMPLE_ROWS if f"{key(m)}|end" in samples]
    if not methods:
        return
    first = samples[f"{key(methods[0])}|start"]
    n = min(6, first.shape[0])
    fig, axes = plt.subplots(
        len(methods) + 1, n, figsize=(1.5 * n + 1.5, 1.5 * (len(methods) + 1)), squeeze=False
    )
    rows = [("pretrained (start)", first)] + [
        (f"{m} (end)", samples[f"{key(m)}|end"]) for m in methods
    ]
    for row, (title, images) in zip(axes, rows, strict=True):
        for j, ax in enumerate(row):
            ax.imshow(images[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(
        "first GRPO seed, fixed ODE noise, 4 passes, calibrated clip: start and end of training",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(folder: Path) -> list[Path]:
    """Every figure above from ``folder/frontier.json`` (and ``samples.pt`` if present)."""
    runs = json.loads((folder / "frontier.json").read_text())["runs"]
    written = []
    for name, draw in (
        ("frontier.png", _frontier),
        ("speed.png", _speed),
        ("hacking.png", _hacking),
        ("clip_by_step.png", _clip_by_step),
    ):
        draw(runs, folder / name)
        if (folder / name).exists():
            written.append(folder / name)
    if (folder / "samples.pt").exists():
        _samples(torch.load(folder / "samples.pt", weights_only=True), folder / "samples.png")
        written.append(folder / "samples.png")
    return written


if __name__ == "__main__":
    for p in write_plots(Path(sys.argv[1])):
        print(f"wrote {p}")
