"""``regclip demo``: the over-optimization experiment from the command line.

``regclip demo`` runs the CPU default (about 5 minutes on 2 cores, first run included
pretraining); ``--budget gpu --device cuda`` the large run; ``--budget tiny`` a smoke test.
Writes ``overopt.json``, ``samples.npz`` and (where matplotlib is installed) the plots into
``--out``, and prints a table of gold metrics at matched proxy reward.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from .config import METHOD_NAMES, PRESET_BUDGETS, DemoConfig
from .report import format_table

__all__ = ["add_arguments", "build_config", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget",
        choices=sorted(PRESET_BUDGETS),
        default="cpu",
        help="named budget: tiny (smoke test), cpu (default), gpu (large run)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=(*METHOD_NAMES, "all"),
        help="methods to compare (default: the budget's)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run, e.g. 0 1 2")
    parser.add_argument("--steps", type=int, help="GRPO iterations per run")
    parser.add_argument("--size", type=int, help="image side (D = size^2)")
    parser.add_argument("--passes", type=int, help="optimizer steps per rollout")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--kl-coef", type=float, help="KL coefficient of flow_grpo_kl")
    parser.add_argument("--clip-target", type=float, help="fraction clipped on the probe")
    parser.add_argument(
        "--dims",
        type=int,
        nargs="*",
        help="latent dimensions of the left-shift study (none: skip it)",
    )
    parser.add_argument("--time-budget", type=float, help="skip runs starting after this many s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("regclip-demo"), help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="write JSON only")
    parser.add_argument(
        "--pretrain-only", action="store_true", help="pretrain (or find in the cache) and stop"
    )


def build_config(args: argparse.Namespace) -> DemoConfig:
    """The budget's config with the command-line overrides applied."""
    fields: dict[str, Any] = dict(PRESET_BUDGETS[args.budget])
    overrides = {
        "steps": args.steps,
        "size": args.size,
        "passes": args.passes,
        "lr": args.lr,
        "clip_target": args.clip_target,
        "kl_coef": args.kl_coef,
        "time_budget": args.time_budget,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if args.methods:
        fields["methods"] = METHOD_NAMES if "all" in args.methods else tuple(args.methods)
    if args.seeds is not None:
        fields["seeds"] = tuple(args.seeds)
    if args.dims is not None:
        fields["dims"] = tuple(args.dims)
    return dataclasses.replace(DemoConfig(), device=args.device, **fields)


def run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment

    cfg = build_config(args)
    if args.pretrain_only:
        from .data import load_digits
        from .pretrain import load_or_pretrain

        pre = load_or_pretrain(cfg, load_digits(cfg.size), torch.device(cfg.device))
        print(f"pretrained networks ready ({pre.seconds:.0f} s of training)")
        return 0
    summary = run_experiment(cfg, args.out)
    print(format_table(summary))
    if "left_shift_vs_dim" in summary:
        alpha = summary["left_shift_vs_dim"]["fitted_exponent"]
        print(f"left shift vs D: fitted exponent {alpha:.2f} (sqrt(D) law: 0.50)")
    if summary["skipped"]:
        print(f"skipped for time: {', '.join(summary['skipped'])}")
    if not args.no_plots:
        try:
            from .plots import write_plots
        except ImportError:
            print("matplotlib not installed: plots skipped")
        else:
            for path in write_plots(args.out):
                print(f"wrote {path}")
    print(f"results in {args.out}/overopt.json ({summary['seconds']:.0f} s)")
    return 0
