"""``regclip train``'s checkpoints: written atomically, ``latest`` falls back past unreadable
ones, a resumed run's log continues without duplicates; smoke runs say where they wrote
and print no unrelated library warnings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regclip.trainer.checkpoint import (
    STATE_FILE,
    find_checkpoint,
    trim_metrics,
    write_checkpoint,
)
from regclip.trainer.config import ConfigError


def _state(iteration: int) -> dict[str, object]:
    return {"trainable": {"w": torch.full((3,), float(iteration))}, "optimizer": {},
            "ema": None, "iteration": iteration, "config": {}}  # fmt: skip


def _write(root: Path, iteration: int) -> Path:
    return write_checkpoint(root / "checkpoints" / f"iter_{iteration:06d}", _state(iteration))


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)

    def crash(folder: Path) -> None:
        assert (folder / STATE_FILE).is_file() and folder != path
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(path, _state(2), crash)  # rewriting the same folder
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "checkpoints" / "iter_000002", _state(2), crash)
    assert not (tmp_path / "checkpoints" / "iter_000002").exists()
    found = find_checkpoint("latest", tmp_path)
    assert found.path == path and found.iteration == 1 and not found.skipped
    assert torch.equal(found.state["trainable"]["w"], torch.ones(3))


def test_rewriting_a_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    (path / "stale.txt").write_text("from the older write")
    write_checkpoint(path, _state(1), lambda folder: (folder / "lora").mkdir())
    assert sorted(p.name for p in path.iterdir()) == ["lora", STATE_FILE]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [path.name]


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_latest_falls_back_to_the_newest_readable_checkpoint(tmp_path: Path, damage: str) -> None:
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    file = newest / STATE_FILE
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    else:
        file.unlink()
    found = find_checkpoint("latest", tmp_path)
    assert found.iteration == 1
    assert len(found.skipped) == 1 and str(newest) in found.skipped[0]
    with pytest.raises(ConfigError, match="resume") as error:
        find_checkpoint(newest, tmp_path)  # named explicitly: no fall-back
    assert error.value.field == "resume"


def test_latest_with_no_readable_checkpoint_names_resume(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no checkpoint") as error:
        find_checkpoint("latest", tmp_path)
    assert error.value.field == "resume"
    (_write(tmp_path, 1) / STATE_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="can be read"):
        find_checkpoint("latest", tmp_path)


def test_trim_metrics_keeps_the_lines_up_to_the_resumed_iteration(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss": i / 10}) + "\n" for i in (1, 2, 3)))
    trim_metrics(log, 2)
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2]
    trim_metrics(tmp_path / "absent.jsonl", 1)  # nothing logged yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def _train(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "regclip.cli", "train", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_smoke_run_names_its_output_and_prints_no_library_warnings(
    tmp_path: Path, arch: str
) -> None:
    pytest.importorskip("diffusers")
    result = _train("--smoke", "--arch", arch, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    # tqdm redraws its bar with carriage returns; every other line is regclip's own
    lines = [line.split("\r")[-1] for line in result.stderr.splitlines()]
    own = [line for line in lines if line and not re.match(r"regclip train: +\d+%\|", line)]
    assert own == [
        f"regclip train: wrote {tmp_path / 'metrics.jsonl'} and checkpoints under "
        f"{tmp_path / 'checkpoints'}"
    ], result.stderr


def test_resume_latest_skips_a_truncated_checkpoint_and_continues_the_log(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    base = ["--smoke", "--arch", "flux", "--vae", "none", "--reward", "latent_std",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert _train(*base, "--iterations", "2").returncode == 0
    newest = tmp_path / "checkpoints" / "iter_000002" / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:1000])
    result = _train(*base, "--iterations", "3", "--resume", "latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: skipped" in result.stderr and "iter_000002" in result.stderr
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.jsonl").open()]
    assert logged == [1, 2, 3]
    assert find_checkpoint("latest", tmp_path).iteration == 3
