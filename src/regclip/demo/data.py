"""scikit-learn's bundled 8x8 digits, read from its CSV without importing scikit-learn.

The file ``sklearn/datasets/data/digits.csv.gz`` ships with scikit-learn; locating it through
``importlib.util.find_spec`` avoids importing scikit-learn (and scipy), which some machines
lack. Images are upsampled bilinearly to ``size x size`` and mapped to [-1, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["Digits", "digits_csv_path", "load_digits"]

NATIVE = 8
NUM_CLASSES = 10


def digits_csv_path() -> Path:
    """Path of scikit-learn's bundled ``digits.csv.gz`` (found without importing sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("regclip demo needs scikit-learn installed for its bundled digits")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"scikit-learn's digits file is missing: {path}")
    return path


@dataclass(frozen=True)
class Digits:
    """All 1797 digits at ``size x size`` in [-1, 1] with labels and a fixed two-way split."""

    images: Tensor
    """(N, 1, size, size) float32."""
    labels: Tensor
    """(N,) int64 in 0..9."""
    split: Tensor
    """(N,) bool: True for split B (the gold classifier's), False for split A (the proxy's)."""

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def of_class(self, label: int) -> Tensor:
        """(N_c, 1, size, size) all real digits of one class."""
        return self.images[self.labels == label]


def upsample(native: Tensor, size: int) -> Tensor:
    """(N, 1, 8, 8) -> (N, 1, size, size) bilinear (identity when size == 8)."""
    if size == native.shape[-1]:
        return native
    return F.interpolate(native, size=(size, size), mode="bilinear", align_corners=False)


def load_digits(size: int = 32) -> Digits:
    """Load, upsample to ``size`` and scale pixel values 0..16 to [-1, 1]."""
    if size < NATIVE:
        raise ValueError(f"`size` must be >= {NATIVE}, got {size}")
    with gzip.open(digits_csv_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    pixels = torch.from_numpy(table[:, :-1]).view(-1, 1, NATIVE, NATIVE) / 8.0 - 1.0
    labels = torch.from_numpy(table[:, -1]).long()
    split = torch.arange(labels.shape[0]) % 2 == 1
    return Digits(upsample(pixels, size).contiguous(), labels, split)
