"""The ``regclip`` command: ``regclip demo`` and ``regclip train``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen one is imported. A subcommand whose optional
dependencies are missing ends in one line naming the extra to install.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "regclip.demo.cli",
        "demo",
        "the reward-hacking testbed: methods x clip ranges x seeds, gold at matched proxy and speed",
    ),
    "train": (
        "regclip.trainer.cli",
        "train",
        "GRPO fine-tuning of diffusers SD3 / Flux transformers",
    ),
}
"""Subcommand -> (module, extra it needs, help line)."""

DESCRIPTION = (
    "Regulated clipping (GRPO-Guard) for RL fine-tuning of flow-matching generators. "
    "Run `regclip <command> --help` for a command's options."
)

OPTIONAL_PACKAGES = frozenset(
    {"accelerate", "diffusers", "matplotlib", "numpy", "peft", "PIL", "tomli", "tqdm"}
    | {"transformers", "sklearn", "triton"}
)
"""Top-level packages that only the extras install (the core needs torch, jaxtyping,
beartype)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``prog: error: message`` (exit 2),
    without the usage block (``--help`` still prints it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _missing_extra(error: ModuleNotFoundError) -> str | None:
    """The missing optional package's name, or None when ``error`` is about another one."""
    top = (error.name or "").split(".")[0]
    return top if top in OPTIONAL_PACKAGES else None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="regclip", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"regclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen: argparse.ArgumentParser | None = None
    for name, (module_name, extra, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if args_list and args_list[0] == name:
            chosen = sub_parser
            try:
                importlib.import_module(module_name).add_arguments(sub_parser)
            except ModuleNotFoundError as error:
                package = _missing_extra(error)
                if package is None:
                    raise
                _extra_error(sub_parser, extra, package)
            sub_parser.set_defaults(_module=module_name, _extra=extra, _parser=sub_parser)
    args, unknown = parser.parse_known_args(args_list)
    assert chosen is not None
    if unknown:
        chosen.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(chosen, unknown)}")
    try:
        return int(importlib.import_module(args._module).run(args))
    except ModuleNotFoundError as error:
        package = _missing_extra(error)
        if package is None:
            raise
        _extra_error(chosen, args._extra, package)


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """``"; did you mean --flag?"`` for the first unknown flag close to one of ``parser``'s."""
    flag = next((a.split("=")[0] for a in unknown if a.startswith("--")), None)
    close = (
        difflib.get_close_matches(flag, list(parser._option_string_actions), n=1) if flag else []
    )
    return f"; did you mean {close[0]}?" if close else ""


def _extra_error(parser: argparse.ArgumentParser, extra: str, package: str) -> NoReturn:
    """Exit with one line: the missing package and the extra that installs it."""
    parser.error(f"needs {package!r}, which is not installed: pip install 'regclip[{extra}]'")


if __name__ == "__main__":
    sys.exit(main())
