"""Small networks: the class-conditional velocity field and the two digit classifiers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import NATIVE, NUM_CLASSES

__all__ = ["GoldClassifier", "ProxyClassifier", "VelocityNet"]


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, FiLM-conditioned on the embedding, residual."""

    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class VelocityNet(nn.Module):
    """Class-conditional U-Net predicting the rectified-flow velocity ``v = eps - x0``.

    ``forward(x (B, 1, H, W), t (B,) in [0, 1], label (B,) int) -> (B, 1, H, W)``. The
    image is cut into ``patch x patch`` patches (pixel unshuffle) so the convolutions run at
    H / patch; then two resolutions and a bottleneck, one residual block each way, and a
    pixel shuffle back. The output is per pixel: D = H * W stays the sample's dimension.
    """

    def __init__(self, width: int = 32, patch: int = 4, emb: int = 64) -> None:
        super().__init__()
        self.freqs = nn.Parameter(
            torch.exp(torch.linspace(0, math.log(1000), emb // 2)), requires_grad=False
        )
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(NUM_CLASSES, emb)
        c1, c2 = width, 2 * width
        self.patch = patch
        self.inp = nn.Conv2d(patch * patch, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, emb)
        self.down2 = _ResBlock(c1, c2, emb)
        self.mid = _ResBlock(c2, c2, emb)
        self.up2 = _ResBlock(2 * c2, c1, emb)
        self.up1 = _ResBlock(2 * c1, c1, emb)
        self.out_norm = nn.GroupNorm(_groups(c1), c1)
        self.out = nn.Conv2d(c1, patch * patch, 3, padding=1)
        for param in self.out.parameters():  # start from v = 0
            nn.init.zeros_(param)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        angles = t[:, None].float() * self.freqs[None]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label_emb(label)
        h0 = self.down1(self.inp(F.pixel_unshuffle(x, self.patch)), emb)
        h1 = self.down2(F.avg_pool2d(h0, 2), emb)
        mid = self.mid(F.avg_pool2d(h1, 2), emb)
        u1 = self.up2(torch.cat([F.interpolate(mid, scale_factor=2.0), h1], dim=1), emb)
        u0 = self.up1(torch.cat([F.interpolate(u1, scale_factor=2.0), h0], dim=1), emb)
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(u0))), self.patch)


class ProxyClassifier(nn.Module):
    """Full-resolution CNN ``(B, 1, H, W) -> (B, 10)`` logits; the *hackable* proxy.

    It sees every pixel and was trained on clean split-A digits only, so its logit margin
    can be raised by off-manifold high-frequency patterns and by contrast beyond [-1, 1].
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class GoldClassifier(nn.Module):
    """Independent judge: average-pools to the native 8x8 then an MLP ``-> (B, 10)``.

    A different architecture, trained on the held-out split B with noise augmentation;
    pooling to 8x8 makes it blind to the high-frequency patterns that fool the proxy.
    """

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(NATIVE * NATIVE, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(F.adaptive_avg_pool2d(x.clamp(-1, 1), NATIVE))
