"""The ``regclip`` command: ``regclip demo`` (the over-optimization experiment) and
``regclip train`` (GRPO fine-tuning of diffusers' SD3 / Flux transformers).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("regclip.demo.cli", "reproduce implicit over-optimization and its fix on digits"),
    "train": ("regclip.trainer.cli", "GRPO fine-tuning of diffusers SD3 / Flux transformers"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="regclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if args_list and args_list[0] == name:
            importlib.import_module(module_name).add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module_name)
    args = parser.parse_args(args_list)
    return int(importlib.import_module(args._module).run(args))


if __name__ == "__main__":
    sys.exit(main())
