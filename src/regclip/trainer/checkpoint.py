"""Checkpoints of ``regclip train``: written atomically, found and checked before any model
is built.

A checkpoint is a folder ``<output_dir>/checkpoints/iter_NNNNNN`` holding
``trainer_state.pt`` (trainable weights, optimizer, EMA, iteration, the run's config) and,
for LoRA runs, ``lora/`` (the adapter in diffusers format). :func:`write_checkpoint` fills
a hidden sibling folder and renames it into place, so a crash leaves the whole checkpoint
or none of it. :func:`find_checkpoint` resolves ``"latest"`` to the newest checkpoint that
loads, skipping (and reporting) newer ones that do not, e.g. truncated or emptied by hand
or by a full disk. :func:`check_config` refuses to resume a run whose config differs in
anything but :data:`RESUMABLE_FIELDS`, naming the field.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig

__all__ = [
    "CHECKPOINTS",
    "RESUMABLE_FIELDS",
    "STATE_FILE",
    "Checkpoint",
    "check_config",
    "find_checkpoint",
    "trim_metrics",
    "write_checkpoint",
]

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
"""The sub-folder of ``output_dir`` holding the ``iter_NNNNNN`` checkpoints."""
RESUMABLE_FIELDS = frozenset(
    {
        "iterations",
        "resume",
        "output_dir",
        "checkpoint_every",
        "device",
        "gradient_checkpointing",
        "cudnn_attention",
    }
)
"""Config fields a resumed run may change: where and how long it runs, not what it trains."""
STATE_KEYS = frozenset({"trainable", "optimizer", "ema", "iteration", "config"})


@dataclass
class Checkpoint:
    """A checkpoint that loaded: its folder, its state, and the newer ones skipped."""

    path: Path
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    """One line per newer checkpoint that could not be read, saying why."""

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])


def write_checkpoint(
    path: Path, state: dict[str, Any], write_extra: Callable[[Path], None] | None = None
) -> Path:
    """Write ``state`` to ``path/trainer_state.pt`` (and whatever ``write_extra(folder)``
    adds) atomically: into a hidden sibling folder, flushed to disk, then renamed to
    ``path``. An existing ``path`` is replaced only once the new one is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with (staging / STATE_FILE).open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if write_extra is not None:
        write_extra(staging)
    if path.exists():
        retired = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired)
    else:
        os.replace(staging, path)
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _load(path: Path) -> dict[str, Any]:
    """The state of checkpoint folder ``path``; a :class:`ConfigError` on ``resume`` saying
    what is wrong when it is missing, truncated or not a trainer state."""
    file = path / STATE_FILE
    if not file.is_file():
        raise ConfigError("resume", f"{path} holds no {STATE_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        text = str(error).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
        raise ConfigError(
            "resume", f"{file} cannot be read (truncated or corrupt: {reason})"
        ) from None
    if not isinstance(state, dict) or not STATE_KEYS.issubset(state):
        raise ConfigError("resume", f"{file} is not a regclip trainer state")
    loaded: dict[str, Any] = state
    return loaded


def find_checkpoint(resume: str | Path, output_dir: str | Path) -> Checkpoint:
    """The checkpoint ``resume`` names: a checkpoint folder, or ``"latest"``, the newest
    readable ``iter_*`` folder under ``output_dir/checkpoints``. Raises a
    :class:`ConfigError` on ``resume`` when there is none."""
    if str(resume) != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError("resume", f"{path} is not a checkpoint folder (it does not exist)")
        return Checkpoint(path, _load(path))
    folder = Path(output_dir) / CHECKPOINTS
    candidates = sorted(folder.glob("iter_*"), reverse=True)
    if not candidates:
        raise ConfigError("resume", f"is 'latest', but {folder} holds no checkpoint to resume from")
    skipped: list[str] = []
    for path in candidates:
        try:
            return Checkpoint(path, _load(path), skipped)
        except ConfigError as error:
            skipped.append(f"skipped {path}: {error.detail}")
    raise ConfigError(
        "resume", f"is 'latest', but no checkpoint under {folder} can be read: {skipped[0]}"
    )


def check_config(checkpoint: Checkpoint, config: TrainConfig) -> None:
    """Refuse (a :class:`ConfigError` naming the field) to resume ``checkpoint`` with a
    ``config`` that trains something else: every field outside :data:`RESUMABLE_FIELDS`
    must equal the checkpoint's."""
    saved: dict[str, Any] = checkpoint.state["config"]
    current = config.to_dict()
    for name, value in current.items():
        if name in RESUMABLE_FIELDS or name not in saved:
            continue
        if _canonical(saved[name]) != _canonical(value):
            raise ConfigError(
                name,
                f"is {value!r}, but the checkpoint {checkpoint.path} was trained with "
                f"{saved[name]!r}; resume with the same value or start a new run in another "
                f"--output-dir",
            )


def _canonical(value: Any) -> str:
    """A comparable form of a config value (tuples and lists alike, keys sorted)."""
    return json.dumps(value, sort_keys=True, default=list)


def trim_metrics(log_path: Path, iteration: int) -> None:
    """Drop the lines of ``metrics.jsonl`` past ``iteration`` (written after the checkpoint
    a run resumes from), atomically, so the log continues without duplicates."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["iteration"] <= iteration]
    if len(kept) == len(lines):
        return
    staging = log_path.with_name(f".{log_path.name}.partial-{os.getpid()}")
    staging.write_text("".join(kept))
    os.replace(staging, log_path)
