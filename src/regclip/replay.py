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

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["new_seeds", "old_mean_from_noise", "step_noise", "step_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One round of SplitMix64 (Steele et al.): a bijective 64-bit mixer."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of rollout ``step`` of the sample whose seed is ``seed``.

    Distinct ``(seed, step)`` pairs give unrelated seeds (two rounds of SplitMix64), so
    neighbouring samples or steps never share a noise stream.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step)


def new_seeds(batch: int, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) int64 fresh per-sample seeds (CPU), drawn from ``generator`` if given."""
    return torch.randint(0, 2**62, (batch,), generator=generator, dtype=torch.int64)


def _as_list(values: Tensor | Sequence[int] | int, batch: int, name: str) -> list[int]:
    if isinstance(values, int):
        return [values] * batch
    out = values.tolist() if isinstance(values, Tensor) else list(values)
    if len(out) != batch:
        raise ValueError(f"`{name}` has {len(out)} entries, expected {batch}")
    return [int(v) for v in out]


def step_noise(
    seeds: Tensor | Sequence[int],
    steps: Tensor | Sequence[int] | int,
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, *shape) standard-normal noise of sample ``i`` at rollout step ``steps[i]``.

    ``seeds`` (B,) are the per-sample seeds (keep them on the CPU: reading them from a GPU
    synchronises); ``steps`` is one step for all samples or (B,) steps (training batches mix
    timesteps); ``shape`` is the latent shape without the batch dim. Deterministic for a
    given ``(seed, step, shape, device type, dtype)``; each sample is drawn from its own
    generator on ``device``, so the result does not depend on the batch it is drawn in.
    """
    seed_list = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
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
