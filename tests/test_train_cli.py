"""``regclip train``'s command line: every flag documented, every mistake one line naming
its flag (exit 2, no traceback), checks before any model is built."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from regclip import presets
from regclip.cli import main
from regclip.trainer.config import ARCH_NAMES, REWARD_NAMES, TrainConfig


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``regclip argv``; assert exit 2 with one error line and return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("regclip train: error:"), lines[0]
    return lines[0]


def _train_parser():
    import argparse

    from regclip.trainer.cli import add_arguments

    parser = argparse.ArgumentParser(prog="regclip train")
    add_arguments(parser)
    return {a.dest: a for a in parser._actions}


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is built: the checks must come first."""
    import regclip.trainer.build as build

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were built before the configuration was checked")

    monkeypatch.setattr(build, "build_components", refuse)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--smoke", "--arch", "nonsense"], "--arch"),
        (["--preset", "nonsense"], "--preset"),
        (["--smoke", "--group-size", "1"], "--group-size"),
        (["--smoke", "--iterations", "-1"], "--iterations"),
        (["--smoke", "--iterations", "0"], "--iterations"),
        (["--smoke", "--passes", "0"], "--passes"),
        (["--smoke", "--lr", "abc"], "--lr"),
        (["--smoke", "--kl-coef", "-0.1"], "--kl-coef"),
        (["--smoke", "--sde-steps", "0", "9"], "--sde-steps"),
        (["--smoke", "--reward", "nope"], "--reward"),
        (["--smoke", "--transformer-config", "{bad"], "--transformer-config"),
        (["--smoke", "--device", "nonsense"], "--device"),
        (["--config", "/nonexistent/run.toml"], "--config"),
    ],
)
def test_each_mistake_is_one_line_naming_the_flag(argv, flag, capsys, no_build, tmp_path):
    line = _fails(["train", "--output-dir", str(tmp_path), *argv], capsys)
    assert flag in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_one_line(capsys, no_build, tmp_path):
    line = _fails(["train", "--smoke", "--device", "cuda", "--output-dir", str(tmp_path)], capsys)
    assert "--device" in line and "CUDA" in line


def test_unwritable_output_dir_is_one_line(capsys, no_build, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _fails(["train", "--smoke", "--output-dir", str(blocker / "run")], capsys)
    assert "--output-dir" in line


@pytest.mark.parametrize(
    ("key", "value", "flag"),
    [("preset", "nonsense", "--preset"), ("group_size", 1, "--group-size"),
     ("sde", "ode", "--sde"), ("unknown_key", 1, "--unknown-key")],
)  # fmt: skip
def test_config_file_mistakes_are_checked_before_building(
    key, value, flag, capsys, no_build, tmp_path
):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({key: value, "output_dir": str(tmp_path), "device": "cpu"}))
    line = _fails(["train", "--config", str(path)], capsys)
    assert flag in line


def test_every_flag_has_help_and_lists_its_choices():
    actions = _train_parser()
    for f in fields(TrainConfig):
        action = actions[f.name]
        assert action.help and len(action.help) > 10, f.name
        if f.metadata["choices"] is not None:
            assert tuple(action.choices) == tuple(f.metadata["choices"]), f.name
    assert tuple(actions["preset"].choices) == tuple(sorted(presets.PRESETS))


@pytest.mark.parametrize(
    "name", [f.name for f in fields(TrainConfig) if f.metadata["range"] is not None]
)
def test_every_numeric_flag_is_range_checked(name, capsys, no_build, tmp_path):
    bounds = next(f.metadata["range"] for f in fields(TrainConfig) if f.name == name)
    if bounds.low is not None:
        bad = bounds.low if bounds.low_open else bounds.low - 1
    else:
        bad = bounds.high + 1
    value = str(int(bad)) if float(bad).is_integer() else str(bad)
    flag = "--" + name.replace("_", "-")
    line = _fails(["train", "--smoke", "--output-dir", str(tmp_path), flag, value], capsys)
    assert flag in line
    with pytest.raises(ValueError, match=f"`{name}`"):
        TrainConfig(**{name: bad})


def test_names_kept_in_the_config_match_the_registries():
    pytest.importorskip("diffusers")
    from regclip.trainer.arch import ARCHITECTURES
    from regclip.trainer.rewards import REWARDS

    assert set(ARCH_NAMES) == set(ARCHITECTURES)
    assert set(REWARD_NAMES) == set(REWARDS)


def test_smoke_runs_write_to_a_folder_per_architecture():
    folders = {TrainConfig.smoke(arch).output_dir for arch in ARCH_NAMES}
    assert len(folders) == len(ARCH_NAMES)
    assert all(arch in TrainConfig.smoke(arch).output_dir for arch in ARCH_NAMES)


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "train" in text
    for developer_note in ("add_arguments", "run(args)", "module", "imported"):
        assert developer_note not in text


def test_building_seeded_models_leaves_the_global_rng_alone(tmp_path: Path):
    pytest.importorskip("diffusers")
    from regclip.trainer import build_components, tiny_vae

    state = torch.random.get_rng_state()
    tiny_vae(3)
    build_components(TrainConfig.smoke("sd3", output_dir=str(tmp_path)))
    assert torch.equal(torch.random.get_rng_state(), state)
    # and the weights are still a function of the seed
    a, b = tiny_vae(3), tiny_vae(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
