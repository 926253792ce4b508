"""The README: its first lines are the two commands a newcomer runs, CI runs its test
command exactly, and its drop-in example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _first_commands() -> list[str]:
    """The lines of the bash block that opens the README."""
    block = re.match(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "the README must open with its two commands"
    return block.group(1).strip().splitlines()


def test_readme_opens_with_the_demo_then_the_tests_each_installing_what_it_runs():
    demo, tests = _first_commands()
    assert demo.endswith("&& regclip demo") and 'pip install -e ".[demo]"' in demo
    install, _, run = tests.partition(" && ")
    assert install == 'pip install -e ".[test]"' and run == "python -m pytest -q"
    assert "python3 -m venv" in README.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in README.read_text()


def test_ci_runs_the_readmes_test_command_exactly():
    _, tests = _first_commands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in lines
    torch_first = next(i for i, line in enumerate(lines) if line.startswith("pip install"))
    assert "torch" in lines[torch_first] and torch_first < lines.index(tests)


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
