"""``regclip demo``: the reward-hacking testbed from the command line.

``regclip demo`` runs the CPU default: vanilla Flow-GRPO, GRPO-Guard and the velocity-space
guard, each at three clip ranges and three seeds, on 24 x 24 disc-world images; ``--budget
gpu --device cuda`` the large version (64 x 64, seven methods, four clip settings, five
seeds); ``--budget tiny`` a smoke test. Writes ``frontier.json``, ``report.md`` and the
plots into ``--out`` and prints the headline tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from .arms import BASE_METHODS
from .config import PRESET_BUDGETS, DemoConfig

__all__ = ["add_arguments", "build_config", "run"]

METHOD_CHOICES = (*BASE_METHODS, *(f"{m}_dance" for m in BASE_METHODS))


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _clip_scale(text: str) -> float | None:
    if text.lower() == "none":
        return None
    return float(_positive(float)(text))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument(
        "--budget",
        choices=sorted(PRESET_BUDGETS),
        default="cpu",
        help="named size: tiny (smoke test), cpu (default, about 2 minutes on 2 cores), "
        "gpu (the large testbed; needs --device cuda)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_CHOICES,
        metavar="METHOD",
        help=f"methods to compare (default: the budget's); choices: {', '.join(METHOD_CHOICES)}",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="GRPO seeds, e.g. 0 1 2; each seed also picks one of two pretrained generators and "
        "one of two proxy raters",
    )
    parser.add_argument("--iterations", type=_positive(int), help="GRPO iterations per run")
    parser.add_argument(
        "--passes", type=_positive(int), nargs="+", help="optimizer steps per rollout, e.g. 1 4 16"
    )
    parser.add_argument(
        "--clip-scales",
        type=_clip_scale,
        nargs="+",
        help="clip ranges as multiples of each method's calibrated one; 'none' for no clip",
    )
    parser.add_argument("--lr", type=_positive(float), help="Adam learning rate")
    parser.add_argument(
        "--time-limit", type=_positive(float), help="seconds per ensemble before it stops early"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    parser.add_argument(
        "--threads",
        type=_positive(int),
        default=1,
        help="CPU threads for torch (default 1: the testbed's small matrix products run "
        "faster on one thread than on two that wait for each other, most of all on a busy "
        "machine)",
    )
    parser.add_argument("--out", type=Path, default=Path("regclip-demo"), help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and report only")


def build_config(args: argparse.Namespace) -> DemoConfig:
    """The budget's config with the command-line overrides applied."""
    fields: dict[str, Any] = dict(PRESET_BUDGETS[args.budget])
    overrides = {
        "iterations": args.iterations,
        "lr": args.lr,
        "time_limit": args.time_limit,
        "methods": tuple(args.methods) if args.methods else None,
        "seeds": tuple(args.seeds) if args.seeds is not None else None,
        "passes": tuple(args.passes) if args.passes else None,
        "clip_scales": tuple(args.clip_scales) if args.clip_scales else None,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(DemoConfig(), device=args.device, **fields)


def _check_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    if args.budget == "gpu" and device.type == "cpu":
        parser.error("--budget gpu: needs --device cuda (hours on a CPU)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.error(f"--out {args.out}: not writable ({error.strerror})")
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        parser.error("--seeds: must be >= 0")


def _headline(result: dict[str, Any]) -> str:
    from .analysis import curve_gap, hacks
    from .report import SPEED_GRID, baseline_of, slice_levels, slices

    runs = result["runs"]
    lines = ["runs whose gold fell while the proxy rose (of runs), per method:"]
    for method in sorted({r["method"] for r in runs}):
        mine = [r for r in runs if r["method"] == method]
        lines.append(f"  {method:24s} {sum(hacks(r) for r in mine)}/{len(mine)}")
    for (sde, size, passes, lr), group in sorted(slices(runs).items()):
        base = baseline_of(sde)
        level = slice_levels(result, group)[1]
        lines.append(
            f"{sde}-SDE, D = {size * size}, {passes} passes, lr {lr:g}: gold minus {base} "
            f"along the speed-gold curves at proxy gain {level:.3g} (mean [95% CI over "
            "replicates]; positive: the method keeps more gold at the same speed):"
        )
        for method in sorted({r["method"] for r in group} - {base}):
            gap = curve_gap(group, method, base, level, SPEED_GRID)
            stat = gap["summary"] if gap else None
            text = f"{stat['mean']:+.3f} [{stat['lo']:+.3f}, {stat['hi']:+.3f}]" if stat else "n/a"
            lines.append(f"  {method:24s} {text}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the testbed as ``args`` say; user mistakes exit through ``args._parser`` (one
    line, exit 2)."""
    parser = getattr(args, "_parser", None)
    if parser is None:
        from ..cli import OneLineParser

        parser = OneLineParser(prog="regclip demo")
    _check_environment(parser, args)
    cfg = build_config(args)
    if not cfg.seeds:
        parser.error("--seeds: give at least one seed")
    import torch

    from .experiment import run_experiment
    from .report import markdown_report

    if cfg.device == "cpu":
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    result = run_experiment(cfg, args.out, log=print)
    (args.out / "report.md").write_text(markdown_report(result))
    print(_headline(result))
    if not args.no_plots:
        try:
            from .plots import write_plots
        except ImportError:
            print("matplotlib is not installed (pip install 'regclip[demo]'): plots skipped")
        else:
            for path in write_plots(args.out):
                print(f"wrote {path}")
    print(
        f"results in {args.out}/frontier.json, tables in {args.out}/report.md "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0
