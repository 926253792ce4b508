r"""Seeded rollout noise: run the guard without storing old means.

A rollout step draws ``next_sample = old_mean + s * noise`` with ``noise ~ N(0, I)``. If the
noise of sample ``i`` at step ``j`` comes from a generator seeded by ``(seed_i, j)``, the
trainer keeps one 8-byte seed per sample instead of one old mean (``4 D`` bytes) per
trained step, and regenerates, exactly,

.. math:: \mu_{old} = x_{t+dt} - s\,\epsilon, \qquad \epsilon = \mathrm{noise}(seed_i, j).

Use the same device type, dtype and latent shape at rollout and at training time (CPU and
CUDA generators give different streams). Typical use::

    seeds = replay.new_seeds(batch)                          # kept with the trajectory
    noise = replay.step_noise(seeds, step, latent_shape, device=dev)
    out = kernel.step(x, v, t, dt, noise=noise)              # rollout
    ...
    loss = loss_fn(..., next_sample=x_next, noise=replay.step_noise(seeds, steps, ...))
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

__all__ = ["new_seeds", "old_mean_from_noise", "step_noise", "step_seed"]

_MASK64 = (1 << 64) - 1
_LIMIT = 1 << 64
"""Seeds and steps are integers in ``[0, 2**64)``: SplitMix64's domain, where distinct
values never share a stream (``2**64`` would wrap onto 0)."""


def _check_int(value: object, name: str) -> int:
    """``value`` as an int in ``[0, 2**64)``; floats (1.2 would truncate onto 1.9's stream),
    bools and out-of-range values are refused, naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    as_int = int(value)
    if not 0 <= as_int < _LIMIT:
        raise ValueError(f"`{name}` must lie in [0, 2**64), got {as_int}")
    return as_int


def _int_list(values: Tensor | Sequence[int], name: str) -> list[int]:
    """A (B,) integer tensor or sequence as checked Python ints."""
    if isinstance(values, Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"`{name}` must be an integer tensor, got {values.dtype}")
        if values.ndim != 1:
            raise ValueError(f"`{name}` must have shape (B,), got {tuple(values.shape)}")
        values = values.tolist()
    return [_check_int(v, name) for v in values]


def _splitmix64(value: int) -> int:
    """One round of SplitMix64 (Steele et al.): a bijective 64-bit mixer."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of rollout ``step`` of the sample whose seed is ``seed``.

    Distinct ``(seed, step)`` pairs give unrelated seeds (two rounds of SplitMix64), so
    neighbouring samples or steps never share a noise stream. Both are integers in
    ``[0, 2**64)``; anything else is refused.
    """
    seed, step = _check_int(seed, "seed"), _check_int(step, "step")
    return _splitmix64(_splitmix64(seed) ^ step)


def new_seeds(batch: int, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) int64 fresh per-sample seeds (CPU), drawn from ``generator`` if given."""
    return torch.randint(0, 2**62, (batch,), generator=generator, dtype=torch.int64)


def _as_list(values: Tensor | Sequence[int] | int, batch: int, name: str) -> list[int]:
    """One step for every sample (an int) or (B,) steps, as checked ints."""
    if isinstance(values, Tensor) and values.ndim == 0:
        return _int_list(values.reshape(1), name) * batch
    if not hasattr(values, "__len__"):
        return [_check_int(values, name)] * batch
    out = _int_list(cast("Tensor | Sequence[int]", values), name)
    if len(out) != batch:
        raise ValueError(f"`{name}` has {len(out)} entries, expected {batch}")
    return out


def step_noise(
    seeds: Tensor | Sequence[int],
    steps: Tensor | Sequence[int] | int,
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, *shape) standard-normal noise of sample ``i`` at rollout step ``steps[i]``.

    ``seeds`` (B,) are the per-sample seeds, integers in ``[0, 2**64)`` (keep them on the
    CPU: reading them from a GPU synchronises); ``steps`` is one step for all samples or
    (B,) steps (training batches mix timesteps); ``shape`` is the latent shape without the batch dim. Deterministic for a
    given ``(seed, step, shape, device type, dtype)``; each sample is drawn from its own
    generator on ``device``, so the result does not depend on the batch it is drawn in.
    """
    seed_list = _int_list(seeds, "seeds")
    step_list = _as_list(steps, len(seed_list), "steps")
    device = torch.device(device)
    out = torch.empty((len(seed_list), *shape), device=device, dtype=dtype)
    generator = torch.Generator(device=device)
    for i, (seed, step) in enumerate(zip(seed_list, step_list, strict=True)):
        generator.manual_seed(step_seed(seed, step))
        out[i] = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return out


def old_mean_from_noise(next_sample: Tensor, std: Tensor | float, noise: Tensor) -> Tensor:
    """(B, ...) ``next_sample - std * noise`` in at least float32 (``std`` scalar or (B,))."""
    dtype = torch.promote_types(next_sample.dtype, torch.float32)
    s = torch.as_tensor(std, dtype=dtype, device=next_sample.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (next_sample.ndim - 1)))
    return next_sample.to(dtype) - s * noise.to(dtype)
