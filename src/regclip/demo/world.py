r"""The disc world: images whose ground truth is known, and an exact gold score for any image.

Every image of the world is one soft-edged disc on a flat background,

.. math:: I(p) = b + (a - b)\, m_{c, r}(p), \qquad
          m_{c, r}(p) = \sigma\big((r - \lVert p - c \rVert) / w\big),

with centre ``c`` on the pixel grid, radius ``r`` on a half-pixel grid, disc brightness
``a ~ U[0.5, 0.95]`` and background ``b ~ U[0, 0.2]`` (pixel values in [0, 1]). The generator
works in ``x = 2 I - 1``.

**Gold.** What the user wants is *contrast*: a bright disc on a dark background, drawn as the
world draws it. :func:`fit_discs` fits the world's own rendering model to any image by exact
least squares over every centre and radius of the grid (an image of the world is fitted with
zero residual), giving the disc-minus-background contrast ``a - b``, the background ``b`` and
the residual RMS ``e`` of what the model cannot explain. The gold score is

.. math:: g = (a - b) - e,

whose ceiling is 1 (a white disc on black) and which starts near 0.63 on the world. It falls
when the background brightens (the hack, measured directly as ``hack = b``) and when the image
leaves the world (``e > 0``); it rises when the disc gets brighter or the background darker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DiscWorld", "GoldFit", "fit_discs", "soft_discs", "to_image", "to_model"]

EDGE = 0.6
"""Edge softness ``w`` in pixels."""


def soft_discs(side: int, cx: Tensor, cy: Tensor, r: Tensor) -> Tensor:
    """(N, side, side) masks ``sigmoid((r - |p - c|) / EDGE)`` for (N,) centres and radii:
    the one disc shape that the world renders and the gold fit searches for."""
    grid = torch.arange(side, dtype=torch.float64, device=cx.device)
    dy = grid.view(1, -1, 1) - cy.view(-1, 1, 1)
    dx = grid.view(1, 1, -1) - cx.view(-1, 1, 1)
    return torch.sigmoid((r.view(-1, 1, 1) - torch.sqrt(dx**2 + dy**2)) / EDGE)


def to_model(image: Tensor) -> Tensor:
    """Pixel values in [0, 1] -> the generator's space ``2 I - 1``."""
    return 2 * image - 1


def to_image(x: Tensor) -> Tensor:
    """The generator's output -> pixel values, clamped to [0, 1] as any image file is."""
    return ((x + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class DiscWorld:
    """Sampler and renderer of the disc world at side ``size`` (D = size**2)."""

    size: int
    brightness: tuple[float, float] = (0.5, 0.95)
    """Range of the disc brightness ``a``."""
    background: tuple[float, float] = (0.0, 0.2)
    """Range of the background ``b``."""

    @property
    def radii(self) -> Tensor:
        """(R,) the radius grid: half pixels from size/8 to size/4."""
        lo, hi = self.size / 8, self.size / 4
        return torch.arange(math.ceil(2 * lo), math.floor(2 * hi) + 1, dtype=torch.float64) / 2

    def mask(self, cx: Tensor, cy: Tensor, r: Tensor) -> Tensor:
        """(N, size, size) soft disc masks for centres (cx, cy) and radii r, each (N,)."""
        return soft_discs(self.size, cx, cy, r)

    def render(self, cx: Tensor, cy: Tensor, r: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """(N, 1, size, size) float32 images in [0, 1] from (N,) attributes."""
        m = self.mask(cx, cy, r)
        image = b.view(-1, 1, 1) + (a - b).view(-1, 1, 1) * m
        return image.unsqueeze(1).float()

    def attributes(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``n`` draws of (cx, cy, r, a, b), float64, on the generator's device."""
        device = generator.device

        def uniform(lo: float, hi: float) -> Tensor:
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            return lo + (hi - lo) * u

        radii = self.radii.to(device)
        r = radii[torch.randint(len(radii), (n,), generator=generator, device=device)]
        margin = torch.ceil(r) + 1
        cx = torch.floor(margin + uniform(0, 1) * (self.size - 2 * margin))
        cy = torch.floor(margin + uniform(0, 1) * (self.size - 2 * margin))
        return dict(cx=cx, cy=cy, r=r, a=uniform(*self.brightness), b=uniform(*self.background))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, 1, size, size) images of the world, in [0, 1]."""
        return self.render(**self.attributes(n, generator))


@dataclass(frozen=True)
class GoldFit:
    """Per-image result of :func:`fit_discs`, each (N,)."""

    contrast: Tensor
    """Fitted ``a - b``."""
    background: Tensor
    """Fitted ``b`` (the hack: the proxy pays for it, the gold does not)."""
    residual: Tensor
    """RMS of what the rendering model cannot explain."""

    @property
    def gold(self) -> Tensor:
        """``contrast - residual`` (higher is better; ceiling 1)."""
        return self.contrast - self.residual


def _disc_kernels(world: DiscWorld, device: torch.device) -> tuple[Tensor, int]:
    """(R, 1, K, K) masks of every grid radius centred in a K x K window, and K // 2."""
    half = math.ceil(float(world.radii.max())) + 6
    k = 2 * half + 1
    radii = world.radii.to(device)
    centre = torch.full_like(radii, float(half))
    return soft_discs(k, centre, centre, radii).unsqueeze(1), half


def _correlate(images: Tensor, masks: Tensor, half: int) -> Tensor:
    """``conv2d(images, masks, padding=half)`` in float64 through the FFT (exact to ~1e-12;
    direct float64 convolution with these large kernels is slow on CPUs).

    images (N, 1, S, S), masks (R, 1, K, K) with K = 2 half + 1 -> (N, R, S, S).
    """
    size, k = images.shape[-1], masks.shape[-1]
    n = size + k - 1
    spec = torch.fft.rfft2(images, s=(n, n)) * torch.fft.rfft2(
        masks.flip(-1, -2).transpose(0, 1), s=(n, n)
    )
    full = torch.fft.irfft2(spec, s=(n, n))  # (N, R, n, n) full convolution
    return full[..., half : half + size, half : half + size]


@torch.no_grad()
def fit_discs(world: DiscWorld, images: Tensor) -> GoldFit:
    r"""Least-squares fit of ``b + c m_{centre, r}`` to each (N, 1, S, S) image in [0, 1].

    For every grid radius and every centre whose disc lies inside the image (as the world
    draws them), the regression of the image on ``[1, m]`` has the closed form
    ``c = cov(I, m) / var(m)``, ``b = mean(I) - c mean(m)``; its explained sum of squares
    ``c * n cov(I, m)`` is maximised over (centre, radius). The sums over the image of
    ``I m``, ``m`` and ``m^2`` for every centre at once are convolutions with the centred mask.
    """
    images = images.to(torch.float64)
    size = images.shape[-1]
    d = size * size
    masks, half = _disc_kernels(world, images.device)
    flat = images.flatten(1)
    sum_x = flat.sum(1).view(-1, 1, 1, 1)
    centred_ss = (flat**2).sum(1) - flat.sum(1) ** 2 / d
    ones = torch.ones_like(images[:1])
    sum_m = _correlate(ones, masks, half)  # (1, R, S, S): the part inside the image
    sum_mm = _correlate(ones, masks**2, half)
    var_m = sum_mm - sum_m**2 / d  # n var(m)
    sum_xm = _correlate(images, masks, half)  # (N, R, S, S): centre at each pixel
    cov = sum_xm - sum_x * sum_m / d  # n cov(I, m)
    explained = cov**2 / var_m
    margin = torch.ceil(world.radii.to(images.device)) + 1
    pos = torch.arange(size, device=images.device, dtype=torch.float64)
    inside = (pos.view(1, -1) >= margin.view(-1, 1)) & (
        pos.view(1, -1) <= size - 1 - margin.view(-1, 1)
    )
    valid = inside.unsqueeze(2) & inside.unsqueeze(1)  # (R, S, S)
    explained = explained.masked_fill(~valid.unsqueeze(0), -math.inf)
    best = explained.flatten(1).argmax(1)
    cov_best = cov.flatten(1).gather(1, best.view(-1, 1)).squeeze(1)
    var_best = var_m.flatten()[best]
    contrast = cov_best / var_best
    background = (sum_x.flatten() - contrast * sum_m.flatten()[best]) / d
    sse = (centred_ss - cov_best**2 / var_best).clamp_min(0)
    return GoldFit(
        contrast=contrast.float(),
        background=background.float(),
        residual=torch.sqrt(sse / d).float(),
    )
