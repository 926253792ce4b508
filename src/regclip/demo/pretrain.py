"""Pretraining of the generator and the two classifiers, cached under ``.cache/regclip/``.

Generator: rectified flow, ``x_t = (1 - t) x0 + t eps`` with ``t ~ U(0, 1)``, trained to
predict ``v = eps - x0`` with the mean squared error. Kept deliberately short so the base
model is imperfect and the gold metrics have headroom. Classifiers: cross-entropy, the
proxy on split A (clean images), the gold judge on split B with Gaussian noise added.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from .config import DemoConfig
from .data import Digits
from .nets import GoldClassifier, ProxyClassifier, VelocityNet

__all__ = ["Pretrained", "load_or_pretrain"]

CACHE_DIR = Path(".cache") / "regclip"


@dataclass
class Pretrained:
    generator: VelocityNet
    proxy: ProxyClassifier
    gold: GoldClassifier
    seconds: float
    """Time spent pretraining (0 when loaded from the cache)."""


def _batches(n: int, batch: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, n, (batch,), generator=generator) for _ in range(steps)]


def train_generator(cfg: DemoConfig, digits: Digits, device: torch.device) -> VelocityNet:
    """Rectified-flow pretraining on all digits (Adam, cosine-decayed lr)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = VelocityNet(cfg.width, cfg.patch).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    images, labels = digits.images.to(device), digits.labels.to(device)
    for idx in _batches(len(labels), cfg.pretrain_batch, cfg.pretrain_steps, gen):
        x0, y = images[idx.to(device)], labels[idx.to(device)]
        t = torch.rand(len(y), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        loss = F.mse_loss(net(x_t, t, y), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


Net = TypeVar("Net", bound=nn.Module)


def train_classifier(
    net: Net,
    digits: Digits,
    use_split_b: bool,
    noise: float,
    steps: int,
    device: torch.device,
) -> Net:
    """Cross-entropy on one split; ``noise`` is the std of additive Gaussian augmentation."""
    gen = torch.Generator().manual_seed(1 + int(use_split_b))
    mask = digits.split if use_split_b else ~digits.split
    images, labels = digits.images[mask].to(device), digits.labels[mask].to(device)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for idx in _batches(len(labels), 128, steps, gen):
        x = images[idx.to(device)]
        if noise > 0:
            x = x + noise * torch.randn(x.shape, generator=gen).to(device)
        loss = F.cross_entropy(net(x), labels[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def load_or_pretrain(cfg: DemoConfig, digits: Digits, device: torch.device) -> Pretrained:
    """Load the three networks from the cache keyed by :meth:`DemoConfig.pretrain_key`,
    or train them and write the cache (``.cache/`` is git-ignored)."""
    path = CACHE_DIR / f"demo-{cfg.pretrain_key()}.pt"
    generator, proxy, gold = VelocityNet(cfg.width, cfg.patch), ProxyClassifier(), GoldClassifier()
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        generator.load_state_dict(state["generator"])
        proxy.load_state_dict(state["proxy"])
        gold.load_state_dict(state["gold"])
        return Pretrained(
            _frozen(generator, device), _frozen(proxy, device), _frozen(gold, device), 0.0
        )
    start = time.perf_counter()
    torch.manual_seed(0)
    generator = train_generator(cfg, digits, device)
    proxy = train_classifier(proxy, digits, False, 0.0, cfg.classifier_steps, device)
    gold = train_classifier(gold, digits, True, 0.3, cfg.classifier_steps, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "generator": generator.state_dict(),
            "proxy": proxy.state_dict(),
            "gold": gold.state_dict(),
        },
        path,
    )
    seconds = time.perf_counter() - start
    return Pretrained(
        _frozen(generator, device), _frozen(proxy, device), _frozen(gold, device), seconds
    )


def _frozen(net: Net, device: torch.device) -> Net:
    """The network on ``device`` in eval mode without gradients (fine-tuning copies it)."""
    return net.to(device).eval().requires_grad_(False)
