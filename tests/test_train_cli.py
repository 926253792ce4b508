"""``regclip train``'s command line: every flag documented, every mistake one line naming
its flag (exit 2, no traceback), checks before any model is built."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _parse(argv: list[str]):
    """``regclip train argv`` parsed as the command line parses it."""
    import argparse

    from regclip.trainer.cli import add_arguments

    parser = argparse.ArgumentParser(prog="regclip train")
    add_arguments(parser)
    return parser.parse_args(argv)


def _checkpoint(folder: Path, config: TrainConfig, iteration: int = 1) -> Path:
    """A trainer-state checkpoint of ``config`` under ``folder/checkpoints`` (no model)."""
    from regclip.trainer.checkpoint import write_checkpoint

    state = {"trainable": {}, "optimizer": {}, "ema": None, "iteration": iteration,
             "config": config.to_dict()}  # fmt: skip
    return write_checkpoint(folder / "checkpoints" / f"iter_{iteration:06d}", state)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--smoke", "--resume", "latest"], "--resume"),
        (["--smoke", "--resume", "/nonexistent/iter_000001"], "--resume"),
        (["--smoke", "--reward", "no_such_module_xyz:score"], "--reward"),
        (["--smoke", "--reward", "json:no_such_function"], "--reward"),
        (["--smoke", "--batch-size", "3"], "--batch-size"),
        (["--smoke", "--accumulate-batches", "3"], "--batch-size"),
        (["--smoke", "--kl-coef", "0.1", "--full-finetune"], "--kl-coef"),
        (["--pretrained", "/nonexistent/sd35m"], "--pretrained"),
        (["--smoke", "--prompts", "p.txt"], "--prompts"),
        (["--smoke", "--embeddings", "e.pt"], "--embeddings"),
        (["--smoke", "--pretrained", "/models/sd35m"], "--pretrained"),
        (["--smoke", "--vae", "none", "--resolution", "20"], "--resolution"),
        (["--transformer-config", "tiny", "--resolution", "520"], "--resolution"),
        (["--smoke", "--lr", "nan"], "--lr"),
        (["--smoke", "--vae", "huge"], "--vae"),
    ],
)
def test_each_mistake_is_one_line_before_any_model_is_built(argv, flag, capsys, no_build, tmp_path):
    line = _fails(["train", "--output-dir", str(tmp_path / "run"), *argv], capsys)
    assert flag in line, line


@pytest.mark.parametrize(
    ("text", "flag"),
    [('group_size = "eight"\n', "--group-size"), ("group_size = 8\nlr = [1]\n", "--lr"),
     ("group_size = \n", "--config"), ("sde_steps = [0, 'a']\n", "--sde-steps")],
)  # fmt: skip
def test_mistyped_toml_values_are_one_line(text, flag, capsys, no_build, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert flag in _fails(["train", "--smoke", "--config", str(path)], capsys)


def test_a_mistyped_config_key_gets_a_did_you_mean(capsys, no_build, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"group_sise": 4}))
    line = _fails(["train", "--config", str(path)], capsys)
    assert "--group-sise" in line and "did you mean `group_size`" in line


def test_bare_train_says_what_to_give_instead_of_complaining_about_cuda(capsys, no_build):
    line = _fails(["train"], capsys)
    assert "--pretrained" in line and "--smoke" in line and "CUDA" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_default_device_without_a_gpu_says_how_to_run_on_the_cpu(capsys, no_build, tmp_path):
    argv = ["train", "--transformer-config", "tiny", "--random-prompts", "2",
            "--output-dir", str(tmp_path)]  # fmt: skip
    line = _fails(argv, capsys)
    assert "--device" in line and "--device cpu" in line and "--smoke" in line


def test_version_prints_the_package_version(capsys):
    import regclip

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"regclip {regclip.__version__}"


def test_a_non_empty_output_dir_is_refused_not_appended_to(capsys, no_build, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    line = _fails(["train", "--smoke", "--output-dir", str(tmp_path)], capsys)
    assert "--output-dir" in line and "--resume latest" in line
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_the_default_smoke_folder_moves_on_when_taken(tmp_path, monkeypatch):
    from regclip.trainer.cli import check_before_building, config_from_args

    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "runs" / "smoke" / "sd3"
    taken.mkdir(parents=True)
    (taken / "metrics.jsonl").write_text("{}\n")
    args = _parse(["--smoke"])
    config, checkpoint = check_before_building(args, config_from_args(args))
    assert checkpoint is None
    assert config.output_dir == str(Path("runs/smoke/sd3-2"))
    assert (taken / "metrics.jsonl").read_text() == "{}\n"


def test_resume_refuses_a_different_config_naming_the_field(capsys, no_build, tmp_path):
    _checkpoint(tmp_path, TrainConfig.smoke("sd3", output_dir=str(tmp_path), seed=0))
    argv = ["train", "--smoke", "--output-dir", str(tmp_path), "--resume", "latest",
            "--iterations", "2"]  # fmt: skip
    line = _fails([*argv, "--seed", "1"], capsys)
    assert line.startswith("regclip train: error: --seed:") and "iter_000001" in line
    assert "--lr:" in _fails([*argv, "--lr", "1e-3"], capsys)
    assert "--iterations:" in _fails(argv[:-2], capsys)  # nothing left to train


def test_resume_accepts_the_same_config_with_more_iterations(tmp_path):
    from regclip.trainer.cli import check_before_building, config_from_args

    _checkpoint(tmp_path, TrainConfig.smoke("flux", output_dir=str(tmp_path)), iteration=3)
    args = _parse(["--smoke", "--arch", "flux", "--output-dir", str(tmp_path), "--resume",
                   "latest", "--iterations", "5", "--checkpoint-every", "2"])  # fmt: skip
    config, checkpoint = check_before_building(args, config_from_args(args))
    assert checkpoint is not None and checkpoint.iteration == 3
    assert config.output_dir == str(tmp_path)


def test_resume_of_an_unreadable_checkpoint_is_one_line(capsys, no_build, tmp_path):
    path = _checkpoint(tmp_path, TrainConfig.smoke("sd3", output_dir=str(tmp_path)))
    (path / "trainer_state.pt").write_bytes(b"")
    argv = ["train", "--smoke", "--output-dir", str(tmp_path), "--iterations", "2"]
    assert "cannot be read" in _fails([*argv, "--resume", str(path)], capsys)
    assert "no checkpoint under" in _fails([*argv, "--resume", "latest"], capsys)


def test_a_mistyped_flag_gets_a_did_you_mean(capsys):
    line = _fails(["train", "--group-sise", "4"], capsys)
    assert "--group-sise" in line and "did you mean --group-size?" in line


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=4,
)


@settings(max_examples=300)
@given(name=st.sampled_from([f.name for f in fields(TrainConfig)]), value=_json_values)
def test_any_config_file_value_is_accepted_or_refused_naming_its_field(name, value):
    """A value of any JSON/TOML type either makes a config or raises the one-line
    ConfigError naming the field: never a TypeError or a silent wrong type."""
    from regclip.trainer.config import ConfigError

    try:
        config = TrainConfig.from_dict({name: value})
    except ConfigError as error:
        assert error.field == name, (error.field, str(error))
        return
    got = getattr(config, name)
    if isinstance(getattr(TrainConfig(), name), float):
        assert isinstance(got, float) and got == got  # numbers become finite floats
    elif "float" in str(TrainConfig.__dataclass_fields__[name].type):  # e.g. `float | None`
        assert got is None or (isinstance(got, float) and got == got)
    else:
        assert got is None or type(got) is type(value) or isinstance(value, (list, tuple))
