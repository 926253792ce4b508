r"""An ensemble of small MLP-Mixer velocity networks, every member trained independently.

Each parameter carries a leading member axis ``E``, so ``E`` networks run as one batched
matrix multiply per layer: many GRPO runs (methods, clip ranges, seeds) share one GPU in
lockstep, each with its own weights, optimizer state and loss, and none sees another's
gradient (the loss is a sum of per-member losses over disjoint parameters).

Member forward, on ``x`` (N, 1, S, S) and ``t`` (N,): patchify to L = (S / p)^2 tokens of
p^2 pixels, embed to C channels, add a learned position embedding and, before every block,
a time embedding (sinusoidal features of ``t`` through a linear map); each block is a
token-mixing MLP over L and a channel MLP over C (pre-LayerNorm, residual); a linear head
maps back to patches. Output: the velocity (N, 1, S, S).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["EnsembleMixer"]


def _time_features(t: Tensor, n: int = 16) -> Tensor:
    """(..., ) -> (..., n) sinusoidal features of t in [0, 1]."""
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), n // 2, device=t.device))
    angle = t.unsqueeze(-1) * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


DATA_VAR = 0.25
"""Per-pixel variance assumed of the data in the model's space (``x = 2 I - 1``)."""


def skip_gain(t: Tensor) -> Tensor:
    """Gain ``c(t)`` of the linear skip ``v = c(t) x_t + F(x_t, t)``: the least-squares linear
    predictor of ``v = eps - x0`` from ``x_t = (1 - t) x0 + t eps`` for zero-mean data of
    variance ``DATA_VAR``, ``c = (t - (1 - t) var) / ((1 - t)^2 var + t^2)``. With it the
    network learns only what a per-pixel linear map cannot: at low noise the state already
    holds the image's edges, and the skip carries them through untouched."""
    var = DATA_VAR
    return (t - (1 - t) * var) / ((1 - t) ** 2 * var + t**2)


class EnsembleMixer(nn.Module):
    """``members`` independent Mixer velocity nets on ``size x size`` single-channel images.

    Call with ``x`` (E, N, 1, S, S) and ``t`` (E, N); returns (E, N, 1, S, S).
    """

    def __init__(
        self,
        members: int,
        size: int,
        patch: int,
        width: int = 128,
        depth: int = 4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if size % patch:
            raise ValueError(f"`patch` ({patch}) must divide `size` ({size})")
        self.members, self.size, self.patch = members, size, patch
        tokens, pix = (size // patch) ** 2, patch * patch
        self.tokens, self.width, self.depth = tokens, width, depth

        def param(*shape: int, fan_in: int | None = None, zero: bool = False) -> nn.Parameter:
            if zero:
                return nn.Parameter(torch.zeros(members, *shape))
            std = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[0])
            return nn.Parameter(torch.randn(members, *shape, generator=generator) * std)

        self.embed = param(pix, width)
        self.pos = param(tokens, width, fan_in=width)
        self.time_w = param(16, depth * width)
        self.tok_in = nn.ParameterList([param(tokens, 2 * tokens) for _ in range(depth)])
        self.tok_out = nn.ParameterList(
            [param(2 * tokens, tokens, zero=True) for _ in range(depth)]
        )
        self.ch_in = nn.ParameterList([param(width, 2 * width) for _ in range(depth)])
        self.ch_out = nn.ParameterList([param(2 * width, width, zero=True) for _ in range(depth)])
        self.head = param(width, pix, zero=True)
        self.checkpoint_blocks = False
        """Recompute each block in the backward pass instead of keeping its activations
        (the same gradient, about a tenth of the memory, a third more compute)."""

    @staticmethod
    def _mm(x: Tensor, w: Tensor) -> Tensor:
        """(E, N, L, A) @ (E, A, B) -> (E, N, L, B), one batched GEMM per member."""
        e, n, tokens, a = x.shape
        return torch.bmm(x.reshape(e, n * tokens, a), w).view(e, n, tokens, w.shape[-1])

    def patchify(self, x: Tensor) -> Tensor:
        """(E, N, 1, S, S) -> (E, N, L, p^2)."""
        e, n = x.shape[:2]
        g, p = self.size // self.patch, self.patch
        return x.reshape(e, n, g, p, g, p).permute(0, 1, 2, 4, 3, 5).reshape(e, n, g * g, p * p)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(E, N, L, p^2) -> (E, N, 1, S, S)."""
        e, n = tokens.shape[:2]
        g, p = self.size // self.patch, self.patch
        x = tokens.reshape(e, n, g, g, p, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(e, n, 1, self.size, self.size)

    def _block(self, h: Tensor, temb: Tensor, k: int) -> Tensor:
        """Block ``k`` on tokens ``h`` (E, N, L, C) with its time embedding (E, N, 1, C)."""
        h = h + temb
        u = F.layer_norm(h, (self.width,)).transpose(-1, -2)  # (E, N, C, L)
        u = self._mm(F.gelu(self._mm(u, self.tok_in[k])), self.tok_out[k])
        h = h + u.transpose(-1, -2)
        u = F.layer_norm(h, (self.width,))
        return h + self._mm(F.gelu(self._mm(u, self.ch_in[k])), self.ch_out[k])

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e, n = x.shape[:2]
        h = self._mm(self.patchify(x), self.embed) + self.pos.unsqueeze(1)
        temb = torch.bmm(_time_features(t), self.time_w).view(e, n, 1, self.depth, self.width)
        for k in range(self.depth):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h = checkpoint(self._block, h, temb[..., k, :], k, use_reentrant=False)
            else:
                h = self._block(h, temb[..., k, :], k)
        out = self.unpatchify(self._mm(F.layer_norm(h, (self.width,)), self.head))
        return out + skip_gain(t).view(e, n, 1, 1, 1) * x

    def member_state(self, index: int) -> dict[str, Tensor]:
        """The weights of one member (for copying into another ensemble)."""
        return {k: v[index].detach().clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_members(
        cls, states: list[dict[str, Tensor]], size: int, patch: int, width: int, depth: int
    ) -> EnsembleMixer:
        """An ensemble whose member i starts from ``states[i]``."""
        net = cls(len(states), size, patch, width, depth)
        net.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})
        return net
