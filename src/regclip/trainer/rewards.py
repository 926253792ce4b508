"""Rewards: a reward is any callable ``reward(images, prompts) -> (B,) tensor``.

``images`` is a float tensor (B, 3, H, W) in [0, 1] on the trainer's device (the VAE
decode of the rollout's final latents) or, when the trainer has no VAE, the final
*latents* themselves (B, C, h, w) (see :func:`latent_std`); ``prompts`` is the list of
B prompt strings (empty strings when training from embeddings only). Return one float
per sample; higher is better. Rewards that call a server (PickScore, OCR, GenEval) are
callables too: send the images, return the scores (see ``docs/training.md``).

Shipped rewards need no download:

* :func:`jpeg_compressibility` -- minus the JPEG size in kB (Flow-GRPO / DDPO's
  ``jpeg_compressibility``), computed with Pillow.
* :func:`colorfulness` -- the Hasler-Suesstrunk colourfulness statistic, an
  aesthetic-style image statistic (a classic, easily hacked proxy).
* :func:`latent_std` -- the per-sample std of the latents, for runs without a VAE.

Refer to a reward by name (:data:`REWARDS`) or as ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "REWARDS",
    "RewardFn",
    "colorfulness",
    "jpeg_compressibility",
    "latent_std",
    "load_reward",
]

RewardFn = Callable[[Tensor, Sequence[str]], Tensor]


def _to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_compressibility(images: Tensor, prompts: Sequence[str] = (), quality: int = 95) -> Tensor:
    """(B,) minus the size in kB of each image saved as JPEG at ``quality``."""
    from PIL import Image

    sizes = []
    for array in _to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(-buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def colorfulness(images: Tensor, prompts: Sequence[str] = ()) -> Tensor:
    r"""(B,) Hasler & Suesstrunk (2003) colourfulness on the 0-255 scale.

    With ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over the pixels:
    ``M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1) * 255
    r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = torch.sqrt(rg.std(dim=1, unbiased=False) ** 2 + yb.std(dim=1, unbiased=False) ** 2)
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return spread + 0.3 * offset


def latent_std(latents: Tensor, prompts: Sequence[str] = ()) -> Tensor:
    """(B,) std of each sample's latents: a download-free reward when there is no VAE."""
    return latents.detach().float().flatten(1).std(dim=1)


REWARDS: dict[str, RewardFn] = {
    "jpeg_compressibility": jpeg_compressibility,
    "colorfulness": colorfulness,
    "latent_std": latent_std,
}


def load_reward(name: str) -> RewardFn:
    """A reward from :data:`REWARDS` or an importable ``"module:function"``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown reward {name!r}: use one of {sorted(REWARDS)} or 'module:function'"
        )
    module_name, attr = name.split(":", 1)
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    reward: RewardFn = fn
    return reward
