"""``regclip train``: GRPO fine-tuning from a config file (JSON/TOML) and/or flags.

Examples::

    regclip train --smoke --arch flux                 # tiny random model, CPU, < 1 min
    regclip train --config sd35m.toml                 # a real run (see docs/training.md)
    accelerate launch --num_processes 8 -m regclip.cli train --config sd35m.toml

Flags override the config file; every :class:`~regclip.trainer.config.TrainConfig`
field is a flag (``--group-size 16``, ``--sde-steps 0 1 2``, ``--no-full-finetune``...).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

from .config import TrainConfig

__all__ = ["add_arguments", "config_from_args", "run"]


def _flag_type(annotation: Any) -> tuple[Any, str | None]:
    """(argparse type, nargs) for a dataclass field's annotation (a string here);
    ``(None, None)`` for booleans, which become ``--flag / --no-flag``."""
    text = str(annotation)
    if text.startswith("list[int]"):
        return int, "+"
    if text.startswith("list[str]"):
        return str, "+"
    if text.startswith("bool"):
        return None, None
    if text.startswith("int"):
        return int, None
    if text.startswith("float"):
        return float, None
    return str, None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a .json or .toml TrainConfig file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random-weight model of --arch, rollout + one update on the CPU",
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, nargs = _flag_type(f.type)
        if kind is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "transformer_config":
            parser.add_argument(flag, default=None, help="'tiny', 'full' or a JSON dict")
        else:
            parser.add_argument(flag, type=kind, nargs=nargs, default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides: dict[str, Any] = {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "transformer_config" and isinstance(value, str) and value.startswith("{"):
            value = json.loads(value)
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        overrides[f.name] = value
    if args.smoke:
        arch = overrides.pop("arch", None)
        if arch is None and args.config:
            arch = TrainConfig.from_file(args.config).arch
        return TrainConfig.smoke(arch or "sd3", **overrides)
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    base.update(overrides)
    return TrainConfig.from_dict(base)


def run(args: argparse.Namespace) -> int:
    from .build import build_components
    from .trainer import GRPOTrainer

    config = config_from_args(args)
    components = build_components(config, device=config.device or "cuda")
    trainer = GRPOTrainer(config, components)
    if config.resume:
        trainer.load_checkpoint(config.resume)
    history = trainer.fit()
    if trainer.accelerator.is_main_process and history:
        last = {k: v for k, v in history[-1].items() if not isinstance(v, dict)}
        print(json.dumps(last, indent=1, sort_keys=True))
    return 0
