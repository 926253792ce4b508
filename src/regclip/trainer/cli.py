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
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import Field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from .checkpoint import CHECKPOINTS, Checkpoint, check_config, find_checkpoint
from .config import ConfigError, Range, TrainConfig

__all__ = ["add_arguments", "check_before_building", "config_from_args", "run"]

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
        help="tiny random-weight model of --arch on random prompts: rollout + one update on "
        "the CPU, written to runs/smoke/<arch> (or the next free runs/smoke/<arch>-N) unless "
        "--output-dir is given; of a --config file only its arch is used",
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


def _check_smoke_flags(args: argparse.Namespace) -> None:
    """``--smoke`` trains on random prompts and weights: refuse the flags it would ignore."""
    if not args.smoke:
        return
    for name in ("pretrained", "prompts", "embeddings"):
        if getattr(args, name, None) is not None:
            raise ConfigError(
                name,
                "is ignored by --smoke, which trains a tiny random model on random prompts: "
                "drop --smoke to train on it",
            )


def _check_inputs(config: TrainConfig) -> None:
    """What the run trains and on which prompts exists on disk."""
    if config.transformer_config is None and config.pretrained is None:
        raise ConfigError(
            "pretrained",
            "is not set: give --pretrained DIR (a diffusers pipeline folder) or --config FILE "
            "(docs/training.md); `regclip train --smoke` checks the install on a CPU",
        )
    if config.pretrained is not None:
        root = Path(config.pretrained)
        if not root.is_dir():
            raise ConfigError(
                "pretrained",
                f"{root} is not a folder: download the diffusers pipeline first, e.g. "
                f"`huggingface-cli download stabilityai/stable-diffusion-3.5-medium "
                f"--local-dir {root}`",
            )
        needed = ["transformer"] if config.transformer_config is None else []
        needed += ["vae"] if config.vae == "pretrained" else []
        for sub in needed:
            if not (root / sub).is_dir():
                raise ConfigError(
                    "pretrained", f"{root} has no {sub}/ folder: is it a diffusers pipeline?"
                )
    if config.random_prompts > 0:
        return
    if config.embeddings is not None and Path(config.embeddings).is_file():
        return
    if config.prompts is None or config.pretrained is None:
        raise ConfigError(
            "prompts",
            "are missing: give --embeddings (an existing file), or --prompts and --pretrained "
            "to encode them, or --random-prompts N",
        )
    if not Path(config.prompts).is_file():
        raise ConfigError("prompts", f"{config.prompts} is not a file")


def _check_reward(name: str) -> None:
    """A ``module:function`` reward imports and is callable (the built-in names are
    checked by :class:`TrainConfig`)."""
    if ":" not in name:
        return
    module_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any error on import is theirs
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError("reward", f"cannot import {module_name!r}: {reason}") from None
    if not callable(getattr(module, attr, None)):
        raise ConfigError("reward", f"{module_name!r} has no function {attr!r}")


def _check_device(device: str | None) -> None:
    import torch

    if device is None and not torch.cuda.is_available():
        raise ConfigError(
            "device",
            "is not set and this machine has no CUDA GPU: pass --device cpu to train on the "
            "CPU (slow), or run `regclip train --smoke` to check the install",
        )
    device = device or "cuda"
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


def _chose_output_dir(args: argparse.Namespace, config: TrainConfig) -> bool:
    """Whether the user named the output folder (a flag, or a config file's own value)."""
    if getattr(args, "output_dir", None) is not None:
        return True
    default = TrainConfig.smoke(config.arch) if args.smoke else TrainConfig()
    return config.output_dir != default.output_dir


def _fresh_output_dir(args: argparse.Namespace, config: TrainConfig) -> TrainConfig:
    """A new run writes into an empty folder. A non-empty one is refused when the user
    named it; the default folder moves on to the first free ``<folder>-N``."""
    folder = Path(config.output_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return config
    if _chose_output_dir(args, config):
        raise ConfigError(
            "output_dir",
            f"{folder} is not empty (it holds an earlier run): continue that run with "
            "--resume latest, or choose another --output-dir",
        )
    n = 2
    while (candidate := folder.with_name(f"{folder.name}-{n}")).is_dir() and any(
        candidate.iterdir()
    ):
        n += 1
    return replace(config, output_dir=str(candidate))


def _check_output_dir(path: str) -> None:
    """The output folder exists (or can be made) and is writable."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("output_dir", f"cannot be created: {error.strerror}: {path}") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("output_dir", f"is not a writable folder: {path}")


def _resume_point(config: TrainConfig) -> Checkpoint | None:
    """The checkpoint ``--resume`` names, checked against ``config``."""
    if config.resume is None:
        return None
    found = find_checkpoint(config.resume, config.output_dir)
    check_config(found, config)
    if config.iterations <= found.iteration:
        raise ConfigError(
            "iterations",
            f"is {config.iterations}, but the checkpoint {found.path} is already at iteration "
            f"{found.iteration}: raise it to train further",
        )
    return found


def check_before_building(
    args: argparse.Namespace, config: TrainConfig
) -> tuple[TrainConfig, Checkpoint | None]:
    """Every check that needs no model, in the order a user meets them; returns the config
    (its output folder moved on when the default one is taken) and the checkpoint to resume
    from. Raises :class:`ConfigError` naming the field."""
    _check_smoke_flags(args)
    _check_inputs(config)
    _check_device(config.device)
    config.check_batches(int(os.environ.get("WORLD_SIZE", "1")))
    _check_reward(config.reward)
    checkpoint = _resume_point(config)
    if checkpoint is None:
        config = _fresh_output_dir(args, config)
    _check_output_dir(config.output_dir)
    return config, checkpoint


@contextmanager
def _quiet_library_logs(quiet: bool) -> Iterator[None]:
    """With ``quiet`` (smoke runs), diffusers' and transformers' own log warnings, about
    the tiny random models' dtype casts and a missing torchvision that training never
    needs, are hidden for the duration; their verbosity is restored after."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (module, module.get_verbosity()) for module in (diffusers_logging, transformers_logging)
    ]
    for module, _ in saved:
        module.set_verbosity_error()
    try:
        yield
    finally:
        for module, level in saved:
            module.set_verbosity(level)


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
        config, checkpoint = check_before_building(args, config_from_args(args))
    except (ValueError, OSError) as error:  # a user's flag or config file
        _fail(parser, error)
    from .build import build_components
    from .trainer import GRPOTrainer

    with _quiet_library_logs(args.smoke):
        try:
            components = build_components(config, device=config.device or "cuda")
        except (ValueError, FileNotFoundError) as error:  # an unreadable embeddings file...
            _fail(parser, error)
        trainer = GRPOTrainer(config, components)
        main = trainer.accelerator.is_main_process
        if checkpoint is not None:
            for line in checkpoint.skipped if main else ():
                print(f"{parser.prog}: warning: {line}", file=sys.stderr)
            trainer.restore(checkpoint.state)
        history = trainer.fit()
    if main and history:
        last = {k: v for k, v in history[-1].items() if not isinstance(v, dict)}
        print(json.dumps(last, indent=1, sort_keys=True))
    if main:
        out = Path(config.output_dir)
        print(
            f"{parser.prog}: wrote {out / 'metrics.jsonl'} and checkpoints under "
            f"{out / CHECKPOINTS}",
            file=sys.stderr,
        )
    return 0
