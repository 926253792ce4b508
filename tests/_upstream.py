"""The marks of a test module that runs real upstream code from a checkout named by an
environment variable: ``pytest -m upstream`` selects it, and it skips, saying what to set,
when the variable is unset."""

from __future__ import annotations

import os

import pytest


def upstream_checkout(variable: str, what: str) -> tuple[str | None, list[pytest.MarkDecorator]]:
    """``(path or None, pytestmark)`` for a module needing ``$variable`` (``what``: the
    checkout to point it at, e.g. "flow_grpo checkout (9745241)")."""
    src = os.environ.get(variable)
    reason = f"set {variable}=/path/to/{what} and run `pytest -m upstream`"
    return src, [pytest.mark.upstream, pytest.mark.skipif(not src, reason=reason)]
