"""One shared input-validation helper: every public entry point checks its tensors here,
so a bad input fails with an error that names the offending argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "as_advantages",
    "as_batch",
    "check_finite",
    "check_positive",
    "check_same_batch",
    "require",
]


def check_positive(value: float, name: str, *, strict: bool = True) -> None:
    """Raise unless ``value`` is a finite number ``> 0`` (``>= 0`` with ``strict=False``).

    Written so that NaN fails too (``NaN <= 0`` is false, so a bare ``value <= 0`` check
    lets it through). ``name`` is how the message names the argument, e.g. ```adv_clip```.
    """
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} 0, got {value}")


def require(value: Tensor | None, name: str, needed_by: str) -> Tensor:
    """Return ``value`` or raise a ``ValueError`` saying which component needs ``name``."""
    if value is None:
        raise ValueError(f"`{name}` is required by {needed_by} but was not given")
    return value


def check_finite(value: Tensor, name: str) -> None:
    """Raise if ``value`` holds NaN or infinity."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")


def check_same_batch(batch: int, value: Tensor, name: str) -> None:
    """Raise if the leading dimension of ``value`` is not ``batch``."""
    if value.ndim == 0 or value.shape[0] != batch:
        raise ValueError(
            f"`{name}` has shape {tuple(value.shape)}; expected batch size {batch} "
            "in its first dimension"
        )


def as_batch(
    value: Tensor | float,
    name: str,
    batch: int,
    like: Tensor,
    *,
    sign: str | None = None,
    finite: bool = True,
) -> Tensor:
    """Broadcast a scalar or (B,) value to a float (B,) tensor on ``like``'s device.

    ``sign`` is ``"positive"`` or ``"negative"`` to require a strict sign (a transition
    std must be > 0; a step dt must be < 0 since sampling runs from t = 1 to t = 0).
    ``finite=False`` skips the finiteness check (and its device synchronisation).
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    tensor = torch.as_tensor(value, dtype=dtype, device=like.device)
    if tensor.ndim == 0 or (tensor.ndim == 1 and tensor.shape[0] in (1, batch)):
        tensor = tensor.expand(batch)
    else:
        raise ValueError(
            f"`{name}` has shape {tuple(tensor.shape)}; expected a scalar or shape ({batch},)"
        )
    if finite:
        check_finite(tensor, name)
    if sign == "positive" and not bool((tensor > 0).all()):
        raise ValueError(f"`{name}` must be > 0 everywhere (got min {tensor.min().item():.3g})")
    if sign == "negative" and not bool((tensor < 0).all()):
        raise ValueError(
            f"`{name}` must be < 0 everywhere: sampling steps run from t = 1 (noise) to "
            f"t = 0 (data), so dt = t_next - t is negative (got max {tensor.max().item():.3g})"
        )
    return tensor


def as_advantages(value: object, like: Tensor | None = None) -> Tensor:
    """``advantages`` as a tensor: a tensor passes through; a list, tuple or NumPy array
    becomes a float tensor on ``like``'s device; anything else is a ``TypeError``."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (bool, int, float)) or not hasattr(value, "__len__"):
        raise TypeError(
            f"`advantages` must be a (B,) tensor, list or array, got {type(value).__name__}"
        )
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`advantages` could not be converted to a tensor: {error}") from None
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    device = like.device if like is not None else None
    return tensor.to(device=device, dtype=torch.promote_types(dtype, torch.float32))
