"""Figures from ``overopt.json`` and ``samples.npz`` (matplotlib; local only).

``python -m regclip.demo.plots FOLDER`` writes into FOLDER:

* ``gold_vs_proxy.png`` -- the headline: each gold metric against the proxy reward, per
  method, mean and min-max band over seeds (interpolated on a common proxy grid);
* ``curves_vs_steps.png`` -- proxy and gold metrics against GRPO iterations;
* ``gold_vs_kl.png`` -- gold metrics and proxy against KL to the pretrained model;
* ``ratio_by_timestep.png`` -- per-timestep ratio mean and std, vanilla ratio of the same
  transitions (before normalization) and the method's own ratio (after);
* ``clip_by_timestep.png`` -- clip engagement per timestep split by advantage sign;
* ``left_shift_vs_dim.png`` -- (1 - mean ratio) / std ratio against D at fixed drift;
* ``samples.png`` -- digits per method from fixed noise, at the start and at the end.
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
import numpy as np

from .analysis import value_at_level

__all__ = ["write_plots"]

GOLD = (
    ("gold_acc", "gold accuracy (independent classifier) ↑"),
    ("nn_dist", "distance to nearest real digit ↓"),
    ("diversity", "within-class diversity ↑"),
    ("kl", "KL to pretrained (per dim, summed over steps) ↓"),
)


def _by_seed(entry: dict[str, Any]) -> list[list[dict[str, float]]]:
    runs: dict[int, list[dict[str, float]]] = defaultdict(list)
    for row in entry["eval"]:
        runs[row["seed"]].append(row)
    return [sorted(rows, key=lambda r: r["step"]) for rows in runs.values()]


def _colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _against(
    ax: Any, methods: dict[str, Any], axis: str, metric: str, colors: dict[str, Any]
) -> None:
    """Metric against ``axis`` per method: mean and min-max over seeds on a common grid."""
    for name, entry in methods.items():
        runs = _by_seed(entry)
        lo = max(min(r[axis] for r in run) for run in runs)
        hi = min(max(r[axis] for r in run) for run in runs)
        if hi <= lo:
            continue
        grid = np.linspace(lo, hi, 25)
        values = np.array(
            [[value_at_level(run, axis, x, metric) for x in grid] for run in runs], dtype=float
        )
        mean = np.nanmean(values, axis=0)
        ax.plot(grid, mean, color=colors[name], label=name)
        if len(runs) > 1:
            ax.fill_between(
                grid, np.nanmin(values, 0), np.nanmax(values, 0), color=colors[name], alpha=0.15
            )


def _gold_vs(summary: dict[str, Any], axis: str, path: Path) -> None:
    methods = summary["methods"]
    colors = _colors(list(methods))
    panels = [(m, t) for m, t in (*GOLD, ("proxy", "proxy reward ↑")) if m != axis]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        _against(ax, methods, axis, metric, colors)
        ax.set_xlabel("proxy reward (logit margin)" if axis == "proxy" else "KL to pretrained")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{summary['device']}: gold metrics against {axis} (mean, band = seed range)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves_vs_steps(summary: dict[str, Any], path: Path) -> None:
    methods = summary["methods"]
    colors = _colors(list(methods))
    panels = (("proxy", "proxy reward ↑"), *GOLD)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for name, entry in methods.items():
            runs = _by_seed(entry)
            steps = [r["step"] for r in runs[0]]
            n = min(len(run) for run in runs)
            values = np.array([[r[metric] for r in run[:n]] for run in runs])
            ax.plot(steps[:n], values.mean(0), color=colors[name], label=name)
            if len(runs) > 1:
                ax.fill_between(
                    steps[:n], values.min(0), values.max(0), color=colors[name], alpha=0.15
                )
        ax.set_xlabel("GRPO iteration")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratio_by_timestep(summary: dict[str, Any], path: Path) -> None:
    methods = summary["methods"]
    colors = _colors(list(methods))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for name, entry in methods.items():
        tab = entry["ratio_by_timestep"]
        steps = np.arange(len(tab["mean"]))
        axes[0, 0].plot(steps, 1 - np.array(tab["raw_mean"]), color=colors[name], label=name)
        axes[1, 0].semilogy(steps, tab["raw_std"], color=colors[name])
        axes[0, 1].plot(steps, 1 - np.array(tab["mean"]), color=colors[name])
        axes[1, 1].semilogy(steps, tab["std"], color=colors[name])
    axes[0, 0].set_title("before normalization (vanilla ratio): 1 - mean", fontsize=9)
    axes[1, 0].set_title("before normalization: std", fontsize=9)
    axes[0, 1].set_title("after (the method's own ratio): 1 - mean", fontsize=9)
    axes[1, 1].set_title("after: std", fontsize=9)
    for ax in axes[:, 0].tolist() + axes[:, 1].tolist():
        ax.axhline(0, color="grey", lw=0.5)
    for ax in axes[1]:
        ax.set_xlabel("sampling step (0 = noise)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        "per-timestep importance ratio, optimizer passes >= 2 of each rollout", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clip_by_timestep(summary: dict[str, Any], path: Path) -> None:
    methods = summary["methods"]
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True
    )
    for ax, (name, entry) in zip(axes.flat, methods.items(), strict=False):
        tab = entry["clip_by_timestep"]
        steps = np.arange(len(tab["frac"]))
        ax.plot(steps, tab["pos_high"], "g-", label="A>0: ratio > 1+eps (clipped)")
        ax.plot(steps, tab["pos_low"], "g:", label="A>0: ratio < 1-eps (not clipped)")
        ax.plot(steps, tab["neg_low"], "r-", label="A<0: ratio < 1-eps (clipped)")
        ax.plot(steps, tab["neg_high"], "r:", label="A<0: ratio > 1+eps (not clipped)")
        ax.set_title(f"{name} (eps {entry['clip_range']:.1e})", fontsize=8)
        ax.set_xlabel("sampling step")
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("clip engagement per timestep by advantage sign (passes >= 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _left_shift(summary: dict[str, Any], path: Path) -> None:
    data = summary["left_shift_vs_dim"]
    dims = np.array(data["dims"], dtype=float)
    measured, predicted = np.array(data["measured"]), np.array(data["predicted"])
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.loglog(dims, measured.mean(1), "o-", label="measured, mean over steps")
    ax.loglog(dims, predicted.mean(1), "k--", label="theory sqrt(mean Δ²) sqrt(D) / (2 s)")
    for k in (0, measured.shape[1] - 1):
        ax.loglog(dims, measured[:, k], ".", alpha=0.6, label=f"measured, step {k}")
    ax.set_xlabel("latent dimension D")
    ax.set_ylabel("(1 - mean ratio) / std ratio")
    ax.set_title(
        f"left shift at fixed drift {data['drift']}: slope "
        f"{data['fitted_exponent']:.2f} (sqrt law 0.5)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _samples(folder: Path, path: Path) -> None:
    arrays = np.load(folder / "samples.npz")
    names = sorted({key.split("/")[0] for key in arrays.files})
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 1.3 * len(names) + 0.5), squeeze=False)
    for row, name in enumerate(names):
        for col, stage in enumerate(("start", "end")):
            images = arrays[f"{name}/{stage}"][:, 0]
            per_class = len(images) // 10
            grid = np.concatenate(
                [
                    np.concatenate(list(images[c * per_class : (c + 1) * per_class]), axis=0)
                    for c in range(10)
                ],
                axis=1,
            )
            axes[row, col].imshow(grid, cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            axes[row, col].set_title(f"{name}: {stage}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(folder: Path) -> list[Path]:
    """Draw every figure for the results in ``folder``; returns the files written."""
    summary = json.loads((folder / "overopt.json").read_text())
    written = []
    jobs = [
        ("gold_vs_proxy.png", lambda p: _gold_vs(summary, "proxy", p)),
        ("gold_vs_kl.png", lambda p: _gold_vs(summary, "kl", p)),
        ("curves_vs_steps.png", lambda p: _curves_vs_steps(summary, p)),
        ("ratio_by_timestep.png", lambda p: _ratio_by_timestep(summary, p)),
        ("clip_by_timestep.png", lambda p: _clip_by_timestep(summary, p)),
    ]
    if "left_shift_vs_dim" in summary:
        jobs.append(("left_shift_vs_dim.png", lambda p: _left_shift(summary, p)))
    if (folder / "samples.npz").is_file():
        jobs.append(("samples.png", lambda p: _samples(folder, p)))
    for name, draw in jobs:
        draw(folder / name)
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for written_path in write_plots(Path(sys.argv[1])):
        print(written_path)
