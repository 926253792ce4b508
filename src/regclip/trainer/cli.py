"""``regclip train``: GRPO fine-tuning from a config file (JSON/TOML) and/or flags.

Examples::

    regclip train --smoke --arch flux                 # tiny random model, CPU, < 1 min
    regclip train --config sd35m.toml                 # a real run (see docs/training.md)
    accelerate launch --num_processes 8 -m regclip.cli train --config sd35m.toml

Flags override the config file; every :class:`~regclip.trainer.config.TrainConfig`
field is a flag (``--group-size 16``, ``--sde-steps 0 1 2``, ``--no-full-finetune``...)
whose help, choices and range come from the field's metadata. A mistake in a flag or a
config file ends in one line, ``regclip train: error: --flag: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, NoReturn

from .config import ConfigError, Range, TrainConfig

__all__ = ["add_arguments", "config_from_args", "run"]

DESCRIPTION = (
    "GRPO fine-tuning of a diffusers SD3 / Flux transformer with a regclip loss. Flags "
    "override --config; see docs/training.md."
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def _checked(
    kind: Callable[[str], Any], bounds: Range | None, optional: bool
) -> Callable[[str], Any]:
    """An argparse type: parse with ``kind``, check ``bounds``; ``none`` unsets an
    ``optional`` field."""

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if bounds is not None and not bounds.contains(value):
            raise argparse.ArgumentTypeError(f"{bounds.describe()}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _help(f: Field[Any], default: Any) -> str:
    """The field's help, its range and its default (``%`` escaped for argparse)."""
    text = f.metadata["help"]
    bounds: Range | None = f.metadata["range"]
    if bounds is not None:
        text += f" ({bounds.describe()})"
    if default is not None and not isinstance(default, list):
        text += f" [default: {default}]"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--config", help="a .json or .toml TrainConfig file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random-weight model of --arch: rollout + one update on the CPU, written "
        "to runs/smoke/<arch> unless --output-dir is given",
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        kind, nargs = _flag_type(f.type)
        help_text = _help(f, getattr(defaults, f.name))
        if kind is None:
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        parser.add_argument(
            _flag(f.name),
            type=_checked(kind, f.metadata["range"], "None" in str(f.type))
            if kind in (int, float)
            else kind,
            nargs=nargs,
            choices=f.metadata["choices"],
            default=None,
            metavar=None if f.metadata["choices"] else f.name.upper(),
            help=help_text,
        )


def _from_file(path: str) -> TrainConfig:
    """``TrainConfig.from_file``, its read and parse errors named as ``--config``'s."""
    try:
        return TrainConfig.from_file(path)
    except ConfigError:
        raise
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError("config", f"{path}: {error}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: ``--config`` file, then flags, then ``--smoke`` defaults."""
    overrides: dict[str, Any] = {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "transformer_config" and isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigError(f.name, f"is not valid JSON: {error}") from None
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        overrides[f.name] = value
    if args.smoke:
        arch = overrides.pop("arch", None)
        if arch is None and args.config:
            arch = _from_file(args.config).arch
        return TrainConfig.smoke(arch or "sd3", **overrides)
    base = _from_file(args.config).to_dict() if args.config else {}
    base.update(overrides)
    return TrainConfig.from_dict(base)


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError("device", f"is not a device name: {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"is {device!r}, but CUDA is not available here")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            "device", f"is {device!r}, but there are {torch.cuda.device_count()} GPU(s)"
        )


def _check_output_dir(path: str) -> None:
    """The output folder exists (or can be made) and is writable."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("output_dir", f"cannot be created: {error.strerror}: {path}") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("output_dir", f"is not a writable folder: {path}")


def _fail(parser: argparse.ArgumentParser, error: Exception) -> NoReturn:
    """Exit with one line naming the flag (a :class:`ConfigError`) or the error."""
    if isinstance(error, ConfigError):
        parser.error(f"{_flag(error.field)}: {error.detail}")
    parser.error(str(error).splitlines()[0] if str(error) else type(error).__name__)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; user mistakes exit through ``args._parser`` (one line)."""
    parser = getattr(args, "_parser", None)
    if parser is None:
        from ..cli import OneLineParser

        parser = OneLineParser(prog="regclip train")
    try:
        config = config_from_args(args)
        _check_device(config.device or "cuda")
        _check_output_dir(config.output_dir)
    except (ValueError, OSError) as error:  # a user's flag or config file
        _fail(parser, error)
    from .build import build_components
    from .trainer import GRPOTrainer

    try:
        components = build_components(config, device=config.device or "cuda")
    except (ValueError, FileNotFoundError) as error:  # missing weights, prompts, reward...
        _fail(parser, error)
    trainer = GRPOTrainer(config, components)
    if config.resume:
        trainer.load_checkpoint(config.resume)
    history = trainer.fit()
    if trainer.accelerator.is_main_process and history:
        last = {k: v for k, v in history[-1].items() if not isinstance(v, dict)}
        print(json.dumps(last, indent=1, sort_keys=True))
    return 0
