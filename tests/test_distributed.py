"""Data-parallel correctness on 2 CPU processes (gloo): advantages gathered across ranks and
DDP-averaged gradients of the guard loss equal a single-process run on the same data."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from regclip import group_advantages, make_kernel, presets

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # numpy arrays pickle by value; tensors would travel as shared memory that dies
        # with this process before the parent reads it
        result = fn(rank, *args)
        plain = [r.numpy() for r in result] if isinstance(result, list) else result.numpy()
        queue.put((rank, plain))
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(fn: Callable, *args) -> dict[int, object]:
    """Run ``fn(rank, *args)`` in 2 spawned gloo processes; return {rank: result}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, fn, args, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _rank_advantages(rank, rewards, ids, sizes):
    start = sum(sizes[:rank])
    return group_advantages(rewards[start : start + sizes[rank]], ids[start : start + sizes[rank]])


def test_gathered_advantages_across_two_gloo_ranks_equal_single_process():
    """Uneven shards, groups split across ranks: each rank gets its slice of the global result."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(13, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 3, (13,), generator=gen)
    results = run_on_two_ranks(_rank_advantages, rewards, ids, [6, 7])
    gathered = torch.cat([torch.from_numpy(results[0]), torch.from_numpy(results[1])])
    torch.testing.assert_close(gathered, group_advantages(rewards, ids))


def _guard_gradient(model: nn.Module, x, labels, v_old, noise, rewards, t, dt):
    """One guard-loss backward of a toy velocity model on (B, D) transitions; returns grads."""
    kernel = make_kernel("flow")
    old = kernel.step(x, v_old, t, dt, noise=noise)
    mean, std = kernel.evaluate(x, model(torch.cat([x, labels], dim=1)), t, dt)
    adv = group_advantages(rewards, labels.argmax(dim=1))
    out = presets.grpo_guard(clip_range=1e-3)(
        advantages=adv,
        mean=mean,
        old_mean=old.mean,
        next_sample=old.next_sample,
        std=std,
        dt=dt,
        t=t,
    )
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _data():
    gen = torch.Generator().manual_seed(1)
    b, d = 8, 12
    labels = torch.nn.functional.one_hot(torch.arange(b) % 2, 2).double()
    return (
        torch.randn(b, d, generator=gen, dtype=torch.float64),
        labels,
        torch.randn(b, d, generator=gen, dtype=torch.float64),
        torch.randn(b, d, generator=gen, dtype=torch.float64),
        torch.randn(b, generator=gen, dtype=torch.float64),
        torch.linspace(0.3, 0.9, b, dtype=torch.float64),
        torch.full((b,), -0.1, dtype=torch.float64),
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(14, 12).double()


def _rank_ddp_gradient(rank):
    model = nn.parallel.DistributedDataParallel(_model())
    shard = slice(rank * 4, rank * 4 + 4)
    return _guard_gradient(model, *(tensor[shard] for tensor in _data()))


def test_ddp_gradients_of_guard_loss_equal_single_process_gradients():
    """Equal shards: DDP averages the two half-batch mean losses' gradients, which is the
    full-batch gradient; advantages are gathered so each group is normalized as one."""
    results = run_on_two_ranks(_rank_ddp_gradient)
    reference = _guard_gradient(_model(), *_data())
    for rank in range(WORLD):
        for got, expected in zip(results[rank], reference, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-10, atol=1e-12)
