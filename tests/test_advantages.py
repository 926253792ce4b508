"""Group-relative advantages against the upstream trackers, and across ranks (gloo)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from regclip import group_advantages
from strategies import seeds


def numpy_reference(rewards, ids, std_mode, eps, ddof):
    """Per-prompt statistics as Flow-GRPO's tracker (ddof=0) / DanceGRPO (ddof=1) compute them."""
    out = np.zeros_like(rewards)
    global_std = np.std(rewards, ddof=ddof)
    for g in np.unique(ids):
        sel = ids == g
        group = rewards[sel]
        std = (
            global_std
            if std_mode == "global"
            else (np.std(group, ddof=ddof) if group.size > ddof else 0.0)
        )
        out[sel] = (group - group.mean()) / (std + eps)
    return out


@given(
    seed=seeds,
    groups=st.integers(1, 6),
    std_mode=st.sampled_from(["group", "global"]),
    flavour=st.sampled_from([(1e-4, False), (1e-8, True)]),
)
def test_matches_per_prompt_reference(seed, groups, std_mode, flavour):
    eps, unbiased = flavour
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, groups, size=24)
    rewards = rng.normal(size=24) * rng.uniform(0.1, 3)
    ours = group_advantages(
        torch.from_numpy(rewards), torch.from_numpy(ids), std=std_mode, eps=eps, unbiased=unbiased
    )
    expected = numpy_reference(rewards, ids, std_mode, eps, int(unbiased))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


@given(seed=seeds)
def test_advantages_are_permutation_equivariant_and_zero_mean_per_group(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (20,), generator=gen)
    rewards = torch.randn(20, generator=gen, dtype=torch.float64)
    adv = group_advantages(rewards, ids)
    perm = torch.randperm(20, generator=gen)
    torch.testing.assert_close(group_advantages(rewards[perm], ids[perm]), adv[perm])
    for g in ids.unique():
        assert abs(float(adv[ids == g].sum())) < 1e-9


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="`group_ids`"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`rewards`"):
        group_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, rewards, ids, sizes, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        queue.put((rank, group_advantages(rewards[local], ids[local], std="group")))
    finally:
        dist.destroy_process_group()


def test_gathered_advantages_across_two_gloo_ranks_equal_single_process():
    """Uneven shards, groups split across ranks: each rank gets its slice of the global result."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(13, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 3, (13,), generator=gen)
    sizes = [6, 7]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, port, rewards, ids, sizes, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    torch.testing.assert_close(torch.cat([results[0], results[1]]), group_advantages(rewards, ids))
