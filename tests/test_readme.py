"""The README's drop-in example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_drop_in_example_runs_and_backpropagates():
    text = README.read_text()
    block = re.search(r"<!-- drop-in example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert block is not None, "README lost its drop-in example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 14
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    grad = namespace["v"].grad  # type: ignore[attr-defined]
    assert grad is not None and bool(grad.abs().sum() > 0)
    assert namespace["out"].metrics["ratio/mean"] > 0  # type: ignore[attr-defined]
