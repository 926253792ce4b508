"""Shape-annotated tensor aliases and the runtime checker used across regclip.

Every public function and ``forward`` is wrapped with :func:`typechecked`, which makes
jaxtyping check the annotated shapes at call time through beartype. Dimension names:

* ``batch`` -- samples in the batch (one transition x_t -> x_{t+dt} each),
* ``*dims`` -- the latent dimensions of one sample (any number, D = their product).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

__all__ = ["Batch", "BatchBool", "BatchInt", "Latent", "Tensor", "typechecked"]

Latent = Float[Tensor, "batch *dims"]
"""One latent per sample, shape (B, ...)."""
Batch = Float[Tensor, " batch"]
"""One scalar per sample, shape (B,)."""
BatchBool = Bool[Tensor, " batch"]
BatchInt = Int[Tensor, " batch"]

F = TypeVar("F", bound=Callable[..., object])


def typechecked(fn: F) -> F:
    """Check the jaxtyping shape annotations of ``fn`` at run time with beartype."""
    return jaxtyped(typechecker=beartype)(fn)
