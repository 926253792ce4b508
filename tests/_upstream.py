"""Shared pieces of the test modules that run real upstream code.

The marks of a test module that runs real upstream code from a checkout named by an
environment variable: ``pytest -m upstream`` selects it, and it skips, saying what to set,
when the variable is unset, or naming the package, when the checkout imports one that is
not installed (``pip install -e ".[upstream]"`` installs them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def upstream_checkout(variable: str, what: str) -> tuple[str | None, list[pytest.MarkDecorator]]:
    """``(path or None, pytestmark)`` for a module needing ``$variable`` (``what``: the
    checkout to point it at, e.g. "flow_grpo checkout (9745241)")."""
    src = os.environ.get(variable)
    reason = f"set {variable}=/path/to/{what} and run `pytest -m upstream`"
    return src, [pytest.mark.upstream, pytest.mark.skipif(not src, reason=reason)]


@contextmanager
def skip_on_missing_dependency(src: str | None) -> Iterator[None]:
    """Inside, a third-party package that the upstream checkout at ``src`` imports and that
    is not installed skips the test with its name; a missing module of regclip, of the
    adapters or of the checkout itself is still an error."""
    try:
        yield
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        own = {"regclip", "integrations"}
        if src is not None and Path(src).is_dir():
            own |= {p.stem for p in Path(src).iterdir()}
        if not top or top in own:
            raise
        pytest.skip(
            f"the upstream checkout imports {top!r}, which is not installed: "
            "pip install -e '.[upstream]' (docs/integrations.md)"
        )


class NoStep:
    """An optimizer that does nothing, so an upstream loop leaves the gradients in place."""

    def step(self) -> None:
        return None

    def zero_grad(self) -> None:
        return None


def take_grads(module: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of ``module``'s gradients, then cleared."""
    out = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out


def rel_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest ``||a - b|| / ||b||`` over the parameters with a non-zero gradient."""
    return max(
        float((a - b).norm() / b.norm())
        for a, b in zip(grads, reference, strict=True)
        if b.norm() > 0
    )
