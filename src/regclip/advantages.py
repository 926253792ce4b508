r"""Group-relative advantages: ``A_i = (r_i - mean_g(r)) / (std + eps)`` per prompt group.

``std="group"`` uses each group's own std (DanceGRPO, Flow-GRPO with ``global_std=False``);
``std="global"`` uses the std of all rewards (Flow-GRPO's default ``global_std=True``).
Flow-GRPO uses the population std (``unbiased=False``) and ``eps=1e-4``; DanceGRPO the
sample std (``unbiased=True``) and ``eps=1e-8``.

Under ``torch.distributed`` the statistics are taken over the rewards of *all* ranks
(gathered with ``all_gather``; ranks may hold different numbers of samples) and each
rank gets back the advantages of its own samples, so a group may be split across ranks.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ._validate import check_finite, check_positive

__all__ = ["group_advantages"]


def _gather_all(value: Tensor) -> tuple[Tensor, int]:
    """Concatenate a (N_rank,) tensor over ranks; also return this rank's offset."""
    world = dist.get_world_size()
    size = torch.tensor([value.shape[0]], device=value.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=value.dtype, device=value.device)
    padded[: value.shape[0]] = value
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    offset = sum(counts[: dist.get_rank()])
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), offset


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: Literal["group", "global"] = "group",
    eps: float = 1e-4,
    unbiased: bool = False,
    gather: bool = True,
) -> Tensor:
    """Per-group normalized advantages, shape (N,) like ``rewards``.

    Args:
        rewards: (N,) scalar rewards of this rank's samples: floating point (the advantages
            keep its dtype) or integer (the advantages are float32, never truncated). A
            bool tensor is refused: pass ``rewards.float()`` if True/False mean 1/0.
        group_ids: (N,) integer id of each sample's group (prompt); ids must mean the same
            group on every rank.
        std: normalize by the group's std or by the global std of all rewards.
        eps: added to the std (>= 0).
        unbiased: sample (ddof=1) instead of population std.
        gather: gather over ranks when ``torch.distributed`` is initialized.

    A group whose rewards are all equal gets advantage exactly 0 (there is nothing to
    prefer), whatever ``eps`` (also 0); a group of one sample also warns (``UserWarning``).
    """
    if rewards.dtype == torch.bool:
        raise ValueError(
            "`rewards` is a bool tensor; pass rewards.float() if True/False mean reward 1/0"
        )
    if rewards.dtype.is_complex:
        raise ValueError(f"`rewards` must be real, got {rewards.dtype}")
    if rewards.ndim != 1:
        raise ValueError(f"`rewards` must have shape (N,), got {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"`group_ids` has shape {tuple(group_ids.shape)}, expected {tuple(rewards.shape)}"
        )
    if group_ids.dtype.is_floating_point:
        raise ValueError("`group_ids` must be an integer tensor")
    if std not in ("group", "global"):
        raise ValueError(f"`std` must be 'group' or 'global', got {std!r}")
    check_positive(eps, "`eps`", strict=False)
    check_finite(rewards, "rewards")
    values = rewards.double()
    ids = group_ids.long()
    offset = 0
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values, offset = _gather_all(values)
        ids, _ = _gather_all(ids)
    _, inverse = torch.unique(ids, return_inverse=True)
    counts = torch.bincount(inverse).double()
    if bool((counts < 2).any()):
        warnings.warn(
            "a group has a single sample: its advantage is 0 (nothing to compare it with); "
            "use groups of at least 2 samples per prompt",
            UserWarning,
            stacklevel=2,
        )
    means = torch.zeros_like(counts).index_add_(0, inverse, values) / counts
    centered = values - means[inverse]
    # groups of equal rewards: exactly 0 (their mean's rounding must not become +/-1 at eps=0)
    high = torch.full_like(counts, -torch.inf).scatter_reduce_(0, inverse, values, "amax")
    low = torch.full_like(counts, torch.inf).scatter_reduce_(0, inverse, values, "amin")
    flat = (high == low)[inverse]
    ddof = 1 if unbiased else 0
    if std == "group":
        sq = torch.zeros_like(counts).index_add_(0, inverse, centered**2)
        group_std = torch.where(
            counts > ddof, sq / (counts - ddof).clamp(min=1), torch.zeros_like(sq)
        ).sqrt()
        scale = group_std[inverse]
    else:
        scale = values.std(unbiased=unbiased) if values.numel() > ddof else values.new_zeros(())
    denom = scale + eps
    advantages = torch.where(flat | (denom == 0), 0.0, centered / denom)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages[offset : offset + rewards.shape[0]].to(dtype)
