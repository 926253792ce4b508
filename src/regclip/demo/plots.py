"""Figures from ``frontier.json`` and ``samples.pt`` (matplotlib, the ``demo`` extra).

``python -m regclip.demo.plots FOLDER`` writes into FOLDER:

* ``frontier.png``: the speed-gold frontier, one panel per slice (kernel, D, passes, lr):
  gold at the middle proxy level against iterations to reach it, one curve per method across
  its settings (the mean over replicates of each replicate's interpolated curve), with each
  setting's mean marked. Up is better (more gold at the same proxy gain), left is faster.
* ``scaling.png``: GRPO-Guard's primary gap to vanilla against D, with the fitted line and
  its prediction at D = 65536.
* ``hacking.png``: proxy, gold and hack against iterations for vanilla at its calibrated clip,
  one line per replicate: the proxy rises while the gold falls and the background brightens.
* ``clip_by_step.png``: fraction of samples clipped per sampling step on the second pass, at
  the calibrated clip, mean over replicates and iterations.
* ``samples.png``: the first replicate's samples from fixed noise at the start, where the
  proxy first reaches the middle level, and at the end, for vanilla and GRPO-Guard.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from .analysis import interpolate, speed_gold_points
from .report import (
    SPEED_GRID,
    baseline_of,
    lr_text,
    reported_runs,
    scaling_gaps,
    slice_levels,
    slices,
)

__all__ = ["write_plots"]

Run = dict[str, Any]


def _colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _mean_curve(runs: list[Run], level: float) -> tuple[list[float], list[float]]:
    """Iterations and mean gold along the grid speeds covered by at least half of the
    replicates' own speed-gold curves."""
    seeds = sorted({r["seed"] for r in runs})
    curves = [speed_gold_points([r for r in runs if r["seed"] == s], level) for s in seeds]
    xs, ys = [], []
    for x in SPEED_GRID:
        values = [v for c in curves if not math.isnan(v := interpolate(c, x))]
        if values and 2 * len(values) >= len(curves):
            xs.append(2**x)
            ys.append(sum(values) / len(values))
    return xs, ys


def _setting_means(runs: list[Run], level: float) -> list[tuple[float, float, str]]:
    """(geometric-mean iterations, mean gold, setting) over the runs of each setting that
    reach ``level``."""
    out = []
    for setting in sorted({r.get("setting", str(r["clip_scale"])) for r in runs}):
        group = [r for r in runs if r.get("setting", str(r["clip_scale"])) == setting]
        points = speed_gold_points(group, level)
        if points:
            x = 2 ** (sum(p[0] for p in points) / len(points))
            out.append((x, sum(p[1] for p in points) / len(points), setting))
    return out


def _frontier(result: dict[str, Any], path: Path) -> None:
    groups = sorted(slices(result["runs"]).items())
    methods = sorted({r["method"].removesuffix("_dance") for r in result["runs"]})
    colors = _colors(methods)
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, ((sde, size, passes, lr), group) in zip(axes.flat, groups, strict=False):
        levels = slice_levels(result, group)
        level = levels[len(levels) // 2]
        for method in sorted({r["method"] for r in group}):
            mine = [r for r in group if r["method"] == method]
            color = colors[method.removesuffix("_dance")]
            xs, ys = _mean_curve(mine, level)
            width = 2.5 if method == baseline_of(sde) else 1.4
            ax.plot(xs, ys, "-", color=color, lw=width, label=method)
            for x, y, setting in _setting_means(mine, level):
                ax.plot([x], [y], "o", color=color, ms=3)
                ax.annotate(setting, (x, y), fontsize=5, color=color, xytext=(2, 2),
                            textcoords="offset points")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("iterations to reach the proxy level (log; left is faster)")
        ax.set_ylabel("gold at that proxy level (up is better)")
        ax.set_title(
            f"{sde}-SDE, D = {size * size}, {passes} pass(es), {lr_text(lr, group)}: "
            f"proxy gain {level:.3g}",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(
        "Speed-gold frontiers: each curve is a method across its settings, mean over\n"
        "replicates; dots: each setting's mean (clip multiple, KL coefficient or target)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scaling(result: dict[str, Any], path: Path) -> None:
    gaps = scaling_gaps(result)
    if len(gaps) < 2:
        return
    from .analysis import bootstrap, scaling_fit

    fit = scaling_fit(gaps, 65536)
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    dims = sorted(gaps)
    for d in dims:
        stat = bootstrap(gaps[d])
        ax.errorbar([math.log2(d)], [stat["mean"]], yerr=[[stat["mean"] - stat["lo"]],
                    [stat["hi"] - stat["mean"]]], fmt="o", color="C0", capsize=3)  # fmt: skip
    xs = [math.log2(dims[0]), 16.0]
    ax.plot(xs, [fit["intercept"]["mean"] + fit["slope"]["mean"] * x for x in xs], "--", color="C0")
    pred = fit["prediction"]
    ax.errorbar([16.0], [pred["mean"]], yerr=[[pred["mean"] - pred["lo"]], [pred["hi"] - pred["mean"]]],
                fmt="s", color="C3", capsize=3, label="extrapolated to SD3.5-M (D = 65536)")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("log2 D (latent size)")
    ax.set_ylabel("GRPO-Guard minus vanilla: gold along the frontier")
    ax.set_title("Does the guard's gain grow with D? (95 % CI over replicates)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _main_size(runs: list[Run]) -> int:
    """The image side with the most Flow-SDE, 4-pass runs (the primary slice)."""
    sides = [r.get("size", 0) for r in runs if r["sde"] == "flow" and r["passes"] == 4]
    return max(set(sides), key=sides.count) if sides else 0


def _hacking(runs: list[Run], path: Path) -> None:
    side = _main_size(runs)
    vanilla = [r for r in runs if r["method"] == "flow_grpo" and r["clip_scale"] == 1.0
               and r["passes"] == 4 and r.get("size") == side]  # fmt: skip
    if not vanilla:
        return
    lr = min(r.get("lr", 0) for r in vanilla)
    vanilla = [r for r in vanilla if r.get("lr", 0) == lr]
    keys = (("proxy", "proxy (rater): up"), ("gold", "gold (exact fit): down is the harm"),
            ("hack", "hack (background brightness): up"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, keys, strict=True):
        for r in vanilla:
            ax.plot([c["iteration"] for c in r["curve"]], [c[key] for c in r["curve"]], lw=1,
                    label=f"replicate {r['seed']}")  # fmt: skip
        ax.set_xlabel("GRPO iteration")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6)
    fig.suptitle(
        f"Vanilla Flow-GRPO at its calibrated clip, D = {side * side}, 4 passes, lr {lr:g}: "
        "one line per replicate"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clip_by_step(runs: list[Run], path: Path) -> None:
    side = _main_size(runs)
    main = [r for r in runs if r["passes"] == 4 and r.get("size") == side and r["sde"] == "flow"]
    methods = sorted({r["method"] for r in main})
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        group = [r["clip_by_step"] for r in main if r["method"] == method and r["clip_by_step"]
                 and (r["clip_scale"] == 1.0 or "final_ranges" in r)]  # fmt: skip
        if group:
            mean = torch.tensor(group).mean(0).tolist()
            ax.plot(range(len(mean)), mean, "o-", color=colors[method], label=method, ms=3)
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("fraction of samples clipped, second pass")
    ax.set_title(
        "Clipping by step at the calibrated clip (mean over replicates and iterations):\n"
        "an even profile means no few noise levels dominate",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _samples(samples: dict[str, torch.Tensor], path: Path) -> None:
    rows: list[tuple[str, torch.Tensor]] = []
    for method in ("flow_grpo", "grpo_guard"):
        for stage, title in (("start", "start"), ("level", "at the middle proxy level"),
                             ("end", "end")):  # fmt: skip
            key = f"{method}|1|4|{stage}"
            if key in samples and (stage != "start" or not rows):
                label = "pretrained" if stage == "start" else f"{method}, {title}"
                rows.append((label, samples[key]))
    if not rows:
        return
    n = min(6, rows[0][1].shape[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n + 2.2, 1.5 * len(rows)), squeeze=False)
    for row, (title, images) in zip(axes, rows, strict=True):
        for j, ax in enumerate(row):
            image = images[j, 0].float()
            ax.imshow((image / 255 if images.dtype == torch.uint8 else image).numpy(),
                      cmap="gray", vmin=0, vmax=1)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(
        "First replicate, same noise, calibrated clip, 4 passes. Look for crisp discs on a dark "
        "background;\nthe hack shows as a brightening background, lost crispness as grey blur",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(folder: Path) -> list[Path]:
    """Every figure above from ``folder/frontier.json`` (and ``samples.pt`` if present)."""
    result = json.loads((folder / "frontier.json").read_text())
    result = dict(result, runs=reported_runs(result))
    written = []
    for name, draw in (("frontier.png", lambda p: _frontier(result, p)),
                       ("scaling.png", lambda p: _scaling(result, p)),
                       ("hacking.png", lambda p: _hacking(result["runs"], p)),
                       ("clip_by_step.png", lambda p: _clip_by_step(result["runs"], p))):  # fmt: skip
        draw(folder / name)
        if (folder / name).exists():
            written.append(folder / name)
    if (folder / "samples.pt").exists():
        _samples(torch.load(folder / "samples.pt", weights_only=True), folder / "samples.png")
        written.append(folder / "samples.png")
    return written


if __name__ == "__main__":
    for p in write_plots(Path(sys.argv[1])):
        print(f"wrote {p}")
