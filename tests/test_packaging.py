"""Packaging: the core installs three dependencies, everything else is an extra, and a
missing extra ends the CLI in one line naming it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIONAL = (
    "numpy", "tqdm", "matplotlib", "diffusers", "peft", "accelerate", "transformers",
    "sklearn", "scipy", "PIL", "triton", "einops",
)  # fmt: skip


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _run_without_optional(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where every optional package is unimportable."""
    prelude = f"import sys\nfor _n in {OPTIONAL!r}:\n    sys.modules[_n] = None\n"
    return subprocess.run(
        [sys.executable, "-W", "ignore::UserWarning", "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": f"{ROOT / 'src'}", "PATH": "/usr/bin:/bin"},
    )


def test_core_dependencies_are_torch_jaxtyping_beartype() -> None:
    names = sorted(d.split(">")[0].split("=")[0].split("<")[0] for d in _project()["dependencies"])
    assert names == ["beartype", "jaxtyping", "torch"]


def _test_files_importing(package: str) -> list[str]:
    """The test and benchmark files that import ``package``."""
    files = [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("test_*.py")]
    pattern = (f"import {package}", f"from {package}")
    return sorted(p.name for p in files if any(s in p.read_text() for s in pattern))


def test_test_extra_is_the_suite_runner_and_what_the_trainer_tests_need() -> None:
    extras = _project()["optional-dependencies"]
    names = sorted(d.split(">")[0].split("[")[0] for d in extras["test"])
    assert names == ["hypothesis", "pytest", "pytest-benchmark", "regclip"]
    assert "regclip[train]" in extras["test"]  # the trainer tests drive diffusers + peft
    assert _test_files_importing("matplotlib") == []  # so `demo` is not needed
    assert not any(d.startswith(("ruff", "mypy", "triton")) for d in extras["test"])
    assert any(d.startswith("diffusers>=") and "<" in d for d in extras["train"])
    assert any(d.startswith("triton") for d in extras["fused"])
    assert {"regclip[test]", "ruff>=0.6", "mypy>=1.11"} <= set(extras["dev"])


def test_einops_is_only_in_the_upstream_extra_and_never_imported() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    declared = list(project["dependencies"])
    for name, extra in extras.items():
        if name != "upstream":
            declared += extra
    assert not any(d.startswith("einops") for d in declared)
    assert "einops" in extras["upstream"] and "regclip[test]" in extras["upstream"]
    sources = (ROOT / "src").rglob("*.py")
    assert not any(
        "import einops" in p.read_text() or "from einops" in p.read_text() for p in sources
    )


def test_import_regclip_and_a_loss_need_only_the_core() -> None:
    result = _run_without_optional(
        """
        import torch, regclip
        g = torch.Generator().manual_seed(0)
        mean = torch.randn(4, 3, generator=g, requires_grad=True)
        loss = regclip.presets.grpo_guard()(
            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), mean=mean,
            old_mean=mean.detach(), next_sample=mean.detach() + 0.1, std=0.1, dt=-0.1, t=0.5,
        ).loss
        loss.backward()
        print("ok", mean.grad is not None)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok True" in result.stdout


def test_train_without_its_extra_names_the_extra_in_one_line() -> None:
    result = _run_without_optional(
        """
        from regclip.cli import main
        main(["train", "--smoke", "--arch", "sd3"])
        """
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regclip train: error:")
    assert "regclip[train]" in lines[0]


def test_train_help_works_without_the_extra() -> None:
    result = _run_without_optional(
        """
        from regclip.cli import main
        main(["train", "--help"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout
