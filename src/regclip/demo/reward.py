r"""The proxy reward: a contrast rater learned on a biased slice of the world.

The rater is a ridge regression of contrast ``a - b`` on the pixel quantiles of the image
(clamped to [0, 1], as files are), fitted on images where lighting is shared: the
background brightens with the disc, ``b = shared * b_hi (a - a_lo) / (a_hi - a_lo) +
(1 - shared) * b_world``. On that slice the bright quantiles (the disc) and the dark ones
(the background) rise together with contrast, so the minimum-norm fit pays for both: on the
world, where ``b`` is independent of ``a``, the rater still ranks images by contrast
(positive correlation with the gold), but raising the background raises the proxy and
lowers the gold. That is the known exploit (:attr:`LinearProxy.sensitivity` measures it),
and the world's own fit (:func:`regclip.demo.world.fit_discs`) measures its use directly
as ``hack = b``.

A proxy seed changes which images the rater sees, hence its weights.
``python -m regclip.demo.reward`` prints, per image side and proxy seed, the rater's
correlation with the gold on 512 world images and its sensitivities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .world import DiscWorld, to_image

__all__ = ["QUANTILES", "LinearProxy", "fit_proxy"]

QUANTILES = (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98)
"""Pixel quantiles the rater reads (with the mean)."""


def _features(image: Tensor) -> Tensor:
    """(N, 1, S, S) images in [0, 1] -> (N, len(QUANTILES) + 1) quantiles and mean."""
    flat = image.flatten(1)
    q = torch.tensor(QUANTILES, dtype=flat.dtype, device=flat.device)
    return torch.cat([torch.quantile(flat, q, dim=1).T, flat.mean(1, keepdim=True)], dim=1)


@dataclass(frozen=True)
class LinearProxy:
    """``proxy(x) = <w, features(clamp(image))> + c``: the rater's predicted contrast."""

    weight: Tensor
    """(F,) ridge weights over :data:`QUANTILES` and the mean."""
    bias: float
    sensitivity: dict[str, float]
    """Mean proxy gain per unit of brightness added to the background or to the disc of
    world images (finite difference of 0.05): the exploit's size."""

    def __call__(self, x: Tensor) -> Tensor:
        """(N, 1, S, S) generator outputs -> (N,) proxy rewards."""
        return _features(to_image(x).float()) @ self.weight.to(x.device) + self.bias

    def rate(self, image: Tensor) -> Tensor:
        """(N, 1, S, S) images in [0, 1] -> (N,) proxy rewards."""
        return _features(image.float()) @ self.weight.to(image.device) + self.bias


def fit_proxy(
    world: DiscWorld, seed: int, n: int = 256, ridge: float = 1e-3, shared: float = 0.8
) -> LinearProxy:
    """Ridge regression of contrast on the quantile features of ``n`` shared-lighting images."""
    gen = torch.Generator().manual_seed(seed)
    att = world.attributes(n, gen)
    (a_lo, a_hi), (_, b_hi) = world.brightness, world.background
    lit = b_hi * (att["a"] - a_lo) / (a_hi - a_lo)
    slice_att = dict(att, b=shared * lit + (1 - shared) * att["b"])
    feats = _features(world.render(**slice_att).double())
    target = slice_att["a"] - slice_att["b"]
    mean_f, mean_y = feats.mean(0), target.mean()
    centred = feats - mean_f
    gram = centred.T @ centred / n + ridge * torch.eye(feats.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, centred.T @ (target - mean_y) / n).float()
    bias = float(mean_y - mean_f @ weight.double())
    proxy = LinearProxy(weight, bias, {})
    base = proxy.rate(world.render(**att))
    gains = {
        name: float(
            (proxy.rate(world.render(**dict(att, **{key: att[key] + 0.05}))) - base).mean() / 0.05
        )
        for name, key in (("background", "b"), ("disc", "a"))
    }
    return LinearProxy(weight, bias, gains)


if __name__ == "__main__":
    from .world import fit_discs, to_model

    for side in (24, 64):
        world = DiscWorld(side)
        images = world.sample(512, torch.Generator().manual_seed(7))
        gold = fit_discs(world, images).gold
        for seed in (0, 1):
            proxy = fit_proxy(world, seed)
            corr = float(torch.corrcoef(torch.stack([proxy(to_model(images)), gold]))[0, 1])
            gains = ", ".join(f"{k} {v:.3f}" for k, v in proxy.sensitivity.items())
            print(
                f"D = {side * side}, proxy seed {seed}: correlation with gold {corr:.3f}; {gains}"
            )
