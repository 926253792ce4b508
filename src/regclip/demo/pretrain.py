"""Rectified-flow pretraining of the disc-world generator, one member per pretraining seed.

``x_t = (1 - t) x0 + t eps`` with ``t ~ U(0, 1)``, trained to predict ``v = eps - x0`` with
the mean squared error (Adam, cosine-decayed learning rate). Each pretraining seed seeds its
member's initial weights and its stream of world images and noise, so a member does not
depend on which other seeds are trained beside it.

Checkpoints are cached by a key of every field that determines them, in ``REGCLIP_CACHE``
(default: the platform's user cache folder), and identified by the SHA-256 of their weights,
which every result file records.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from .config import DemoConfig
from .nets import EnsembleMixer
from .rollout import ode_sample, time_schedule
from .world import DiscWorld, fit_discs, to_image, to_model

__all__ = ["Pretrained", "cache_dir", "checkpoint_path", "load_or_pretrain", "weights_hash"]


def cache_dir() -> Path:
    """``$REGCLIP_CACHE``, else ``$XDG_CACHE_HOME/regclip`` (``~/.cache/regclip``), or
    ``%LOCALAPPDATA%\\regclip`` on Windows."""
    if env := os.environ.get("REGCLIP_CACHE"):
        return Path(env)
    if sys.platform == "win32" and (local := os.environ.get("LOCALAPPDATA")):
        return Path(local) / "regclip"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "regclip"


def checkpoint_path(cfg: DemoConfig, seed: int) -> Path:
    """Where the generator of ``cfg``'s pretraining fields and ``seed`` is cached."""
    return cache_dir() / "pretrain" / f"{cfg.pretrain_key()}-seed{seed}.pt"


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """First 16 hex digits of the SHA-256 of the weights (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous()
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Pretrained:
    """Pretrained members, one per pretraining seed."""

    states: dict[int, dict[str, torch.Tensor]]
    """pretraining seed -> member weights (CPU)."""
    hashes: dict[int, str]
    """pretraining seed -> :func:`weights_hash` of its weights."""
    seconds: float
    """Time spent pretraining (0 when every member came from the cache)."""


@torch.no_grad()
def _gold(net: EnsembleMixer, cfg: DemoConfig, samples: int = 64) -> float:
    """Mean gold over the members of ``samples`` ODE samples from fixed noise (progress)."""
    device = next(net.parameters()).device
    noise = torch.randn(
        (samples, 1, cfg.size, cfg.size), generator=torch.Generator().manual_seed(0)
    ).to(device)
    images = to_image(ode_sample(net, time_schedule(cfg.num_steps, cfg.shift), noise))
    world = DiscWorld(cfg.size)
    return sum(float(fit_discs(world, member).gold.mean()) for member in images) / len(images)


def _train(
    cfg: DemoConfig, seeds: list[int], device: torch.device, log: Callable[[str], None]
) -> EnsembleMixer:
    members = [
        EnsembleMixer(
            1, cfg.size, cfg.patch, cfg.width, cfg.depth, torch.Generator().manual_seed(s)
        )
        for s in seeds
    ]
    net = EnsembleMixer.from_members(
        [m.member_state(0) for m in members], cfg.size, cfg.patch, cfg.width, cfg.depth
    ).to(device)
    world = DiscWorld(cfg.size)
    gens = [torch.Generator(device).manual_seed(1_000_003 * s + 17) for s in seeds]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    shape = (cfg.pretrain_batch, 1, cfg.size, cfg.size)
    for step in range(cfg.pretrain_steps):
        x0 = torch.stack([to_model(world.sample(cfg.pretrain_batch, g)) for g in gens])
        t = torch.stack([torch.rand(cfg.pretrain_batch, generator=g, device=device) for g in gens])
        eps = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
        tt = t.view(*t.shape, 1, 1, 1)
        loss = F.mse_loss(net((1 - tt) * x0 + tt * eps, t), eps - x0) * len(seeds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, cfg.pretrain_steps // 5) == 0:
            log(
                f"pretraining step {step + 1}/{cfg.pretrain_steps}: loss "
                f"{loss.item() / len(seeds):.4f}, gold of ODE samples {_gold(net, cfg):.3f}"
            )
    return net


def load_or_pretrain(
    cfg: DemoConfig,
    seeds: list[int],
    device: torch.device,
    log: Callable[[str], None] = print,
) -> Pretrained:
    """The members for ``seeds``: from the cache where present, else trained (and cached)."""
    paths = {s: checkpoint_path(cfg, s) for s in seeds}
    missing = [s for s in seeds if not paths[s].exists()]
    start = time.perf_counter()
    if missing:
        log(f"pretraining {len(missing)} generator(s) (D = {cfg.size**2}); cached afterwards")
        net = _train(cfg, missing, device, log)
        paths[missing[0]].parent.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(missing):
            buffer = io.BytesIO()
            torch.save({k: v.cpu() for k, v in net.member_state(i).items()}, buffer)
            tmp = paths[s].with_suffix(".tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(paths[s])
    states = {s: torch.load(paths[s], map_location="cpu", weights_only=True) for s in seeds}
    hashes = {s: weights_hash(states[s]) for s in seeds}
    return Pretrained(states, hashes, time.perf_counter() - start if missing else 0.0)
