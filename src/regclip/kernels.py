r"""Transition kernels: the Gaussian policies that GRPO trainers build from a flow sampler.

Conventions (those of the upstream trainers): rectified flow with ``t = 1`` pure noise and
``t = 0`` data, ``x_t = (1 - t) x0 + t eps``, the network predicts the velocity
``v = eps - x0``, and a sampling step goes from ``t`` to ``t + dt`` with ``dt < 0``
(``t`` is the scheduler's sigma). Each kernel is a policy

.. math:: \pi(x_{t+dt} \mid x_t) = \mathcal N(\mu_\theta(x_t, t, dt),\; s_t^2 I),

whose mean is affine in the velocity, ``mu = a_t x + c_t v``; ``c_t = d mu / d v`` is
:meth:`TransitionKernel.velocity_slope`. ``std`` always means the *transition* standard
deviation ``s_t``, e.g. ``sigma_t * sqrt(-dt)`` for the SDE kernels, not ``sigma_t``.

Shapes: ``sample``, ``velocity``, ``mean``, ``next_sample`` are ``(B, ...)``; ``t``, ``dt``
and everything per-sample are ``(B,)`` (a Python float broadcasts).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._typing import Batch, Latent, typechecked
from ._validate import as_batch, check_finite, check_positive

__all__ = [
    "CPS",
    "DanceSDE",
    "FlowSDE",
    "KernelStep",
    "TransitionKernel",
    "gaussian_log_prob",
    "make_kernel",
]


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    """View a (B,) tensor so that it broadcasts against a (B, ...) latent."""
    return value.view(-1, *([1] * (like.ndim - 1)))


def _reduce_dims(value: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return value.mean(dim=tuple(range(1, value.ndim)))


@typechecked
def gaussian_log_prob(next_sample: Latent, mean: Latent, std: Batch) -> Batch:
    r"""Per-sample Gaussian log-density, averaged (not summed) over the D latent dims.

    ``log p = mean_D[-(x - mu)^2 / (2 s^2)] - log s - log sqrt(2 pi)``: the convention of
    Flow-GRPO and DanceGRPO. Computed in at least float32. ``std`` must be > 0 (a zero std
    has no density: the log-prob would be +/-inf).
    """
    if not bool((std > 0).all()):
        raise ValueError(
            f"`std` must be > 0 everywhere (got min {std.min().item():.3g}); a Gaussian "
            "with std 0 has no log-density"
        )
    dtype = torch.promote_types(mean.dtype, torch.float32)
    x, mu, s = next_sample.to(dtype), mean.to(dtype), std.to(dtype)
    sq = _reduce_dims((x.detach() - mu) ** 2)
    return -sq / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class KernelStep:
    """One sampled transition. ``next_sample = mean + std * noise`` exactly (same dtype)."""

    next_sample: Tensor
    """(B, ...) the draw x_{t+dt}."""
    mean: Tensor
    """(B, ...) the proposal mean mu(x_t)."""
    std: Tensor
    """(B,) the transition standard deviation s_t."""
    log_prob: Tensor
    """(B,) log pi(next_sample | x_t) in the kernel's upstream convention."""
    noise: Tensor
    """(B, ...) the standard normal draw."""


class TransitionKernel(nn.Module, ABC):
    """A Gaussian one-step policy built from a velocity field (see module docstring)."""

    eta: float

    @abstractmethod
    def std(self, t: Tensor, dt: Tensor) -> Tensor:
        """(B,) transition std s_t for steps from ``t`` to ``t + dt``."""

    @abstractmethod
    def mean(self, sample: Tensor, velocity: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        """(B, ...) proposal mean mu(x_t) for the current velocity prediction."""

    @abstractmethod
    def velocity_slope(self, t: Tensor, dt: Tensor) -> Tensor:
        """(B,) c_t = d mu / d v (the mean is affine in the velocity)."""

    def log_prob(self, next_sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """(B,) log-density of ``next_sample`` (upstream mean-over-dims convention)."""
        return gaussian_log_prob(next_sample, mean, std)

    def _times(
        self, sample: Tensor, t: Tensor | float, dt: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        batch = sample.shape[0]
        t_b = as_batch(t, "t", batch, sample, sign="positive")
        if bool((t_b > 1).any()):
            raise ValueError("`t` must lie in (0, 1] (t = 1 is pure noise)")
        dt_b = as_batch(dt, "dt", batch, sample, sign="negative")
        if bool((t_b + dt_b < 0).any()):
            raise ValueError(
                "the step ends past t = 0 (data): `t + dt` must be >= 0, got min "
                f"{(t_b + dt_b).min().item():.3g}"
            )
        return t_b, dt_b

    @typechecked
    def evaluate(
        self,
        sample: Latent,
        velocity: Latent,
        t: Tensor | float,
        dt: Tensor | float,
    ) -> tuple[Latent, Batch]:
        """Mean (B, ...) and transition std (B,) of the step, in at least float32."""
        if sample.shape != velocity.shape:
            raise ValueError(
                f"`velocity` has shape {tuple(velocity.shape)} but `sample` has "
                f"{tuple(sample.shape)}"
            )
        t_b, dt_b = self._times(sample, t, dt)
        dtype = torch.promote_types(sample.dtype, torch.float32)
        return (
            self.mean(sample.to(dtype), velocity.to(dtype), t_b, dt_b),
            self.std(t_b, dt_b),
        )

    @typechecked
    def step(
        self,
        sample: Latent,
        velocity: Latent,
        t: Tensor | float,
        dt: Tensor | float,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        next_sample: Tensor | None = None,
    ) -> KernelStep:
        """Sample ``x_{t+dt} = mu + s * noise`` (or score a given ``next_sample``).

        ``noise`` (B, ...) replaces the draw (used to regenerate a rollout exactly);
        ``generator`` seeds the draw; ``next_sample`` skips sampling and only evaluates.
        """
        mean, std = self.evaluate(sample, velocity, t, dt)
        s = _per_sample(std, mean)
        if next_sample is not None:
            if next_sample.shape != mean.shape:
                raise ValueError(
                    f"`next_sample` has shape {tuple(next_sample.shape)}, expected "
                    f"{tuple(mean.shape)}"
                )
            check_finite(next_sample, "next_sample")
            next_sample = next_sample.to(mean.dtype)
            noise = (next_sample - mean.detach()) / s
        else:
            if noise is None:
                noise = torch.randn(
                    mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
                )
            elif noise.shape != mean.shape:
                raise ValueError(
                    f"`noise` has shape {tuple(noise.shape)}, expected {tuple(mean.shape)}"
                )
            next_sample = mean.detach() + s * noise.to(mean.dtype)
        return KernelStep(next_sample, mean, std, self.log_prob(next_sample, mean, std), noise)


class FlowSDE(TransitionKernel):
    r"""Flow-GRPO's SDE: ``sigma_t = eta sqrt(t / (1 - t))``, ``s_t = sigma_t sqrt(-dt)``,

    ``mu = x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt``.

    At ``t = 1`` upstream replaces the ``t`` in ``1 - t`` by the schedule's largest sigma
    below 1 (``sigmas[1]``): pass it as ``sigma_max`` (or build with :meth:`from_sigmas`).
    ``velocity_slope`` is ``beta_t dt`` with ``beta_t = 1 + sigma_t^2 (1 - t) / (2t)``,
    which equals ``1 + eta^2 / 2`` for every ``t < 1``.
    """

    def __init__(self, eta: float = 0.7, sigma_max: float | None = None) -> None:
        super().__init__()
        check_positive(eta, "`eta`")
        if sigma_max is not None and not 0 < sigma_max < 1:
            raise ValueError(f"`sigma_max` must lie in (0, 1), got {sigma_max}")
        self.eta = eta
        self.sigma_max = sigma_max

    @classmethod
    def from_sigmas(cls, sigmas: Tensor, eta: float = 0.7) -> FlowSDE:
        """Kernel for a scheduler's sigma schedule (``sigmas[0] = 1``): sigma_max = sigmas[1]."""
        return cls(eta=eta, sigma_max=float(sigmas[1]))

    def sigma(self, t: Tensor) -> Tensor:
        """(B,) the SDE noise level sigma_t (before the sqrt(-dt) of the step)."""
        at_one = t == 1
        if self.sigma_max is None and bool(at_one.any()):  # no device read when set
            raise ValueError(
                "FlowSDE at t = 1 needs `sigma_max` (the schedule's largest sigma below 1, "
                "sigmas[1] upstream): build it with FlowSDE.from_sigmas(sigmas, eta)"
            )
        denom_t = torch.where(at_one, torch.full_like(t, self.sigma_max or 0.0), t)
        return self.eta * torch.sqrt(t / (1 - denom_t))

    def _beta(self, t: Tensor) -> Tensor:
        return 1 + self.sigma(t) ** 2 * (1 - t) / (2 * t)

    def std(self, t: Tensor, dt: Tensor) -> Tensor:
        return self.sigma(t) * torch.sqrt(-dt)

    def mean(self, sample: Tensor, velocity: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        sig2 = _per_sample(self.sigma(t) ** 2, sample)
        t_, dt_ = _per_sample(t, sample), _per_sample(dt, sample)
        return (
            sample * (1 + sig2 / (2 * t_) * dt_) + velocity * (1 + sig2 * (1 - t_) / (2 * t_)) * dt_
        )

    def velocity_slope(self, t: Tensor, dt: Tensor) -> Tensor:
        return self._beta(t) * dt


class DanceSDE(TransitionKernel):
    r"""DanceGRPO's SDE (``flux_step`` with ``sde_solver=True``): constant ``eta``,

    ``mu = x + v dt - (eta^2 / 2) score dt`` with ``score = -(x + (1 - t) v) / t``, and
    ``s_t = eta sqrt(-dt)``. ``velocity_slope`` is ``beta_t dt`` with
    ``beta_t = 1 + eta^2 (1 - t) / (2t)``, which grows without bound as ``t -> 0``.
    With ``score_correction=False`` the mean is the plain Euler step ``x + v dt``.
    """

    def __init__(self, eta: float = 0.3, score_correction: bool = True) -> None:
        super().__init__()
        check_positive(eta, "`eta`")
        self.eta = eta
        self.score_correction = score_correction

    def std(self, t: Tensor, dt: Tensor) -> Tensor:
        return self.eta * torch.sqrt(-dt)

    def mean(self, sample: Tensor, velocity: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        t_, dt_ = _per_sample(t, sample), _per_sample(dt, sample)
        euler = sample + velocity * dt_
        if not self.score_correction:
            return euler
        score = -(sample + (1 - t_) * velocity) / t_
        return euler - 0.5 * self.eta**2 * score * dt_

    def velocity_slope(self, t: Tensor, dt: Tensor) -> Tensor:
        if not self.score_correction:
            return dt
        return (1 + self.eta**2 * (1 - t) / (2 * t)) * dt


class CPS(TransitionKernel):
    r"""Coefficients-preserving sampling (Flow-GRPO's ``sde_type="cps"``).

    With ``t' = t + dt``, ``s = t' sin(eta pi / 2)``, ``x0 = x - t v`` and
    ``eps = x + (1 - t) v``: ``mu = x0 (1 - t') + eps sqrt(t'^2 - s^2)`` and std ``s``.
    ``velocity_slope`` is ``-t (1 - t') + (1 - t) sqrt(t'^2 - s^2)``.

    :meth:`log_prob` follows upstream's CPS convention, ``-mean_D (x - mu)^2`` with no
    constants and no ``1 / (2 s^2)``: it is *not* a normalized log-density, so pass means
    (not these log-probs) to :class:`regclip.GuardedPPOLoss`.
    """

    def __init__(self, eta: float = 0.7) -> None:
        super().__init__()
        if not 0 < eta <= 1:
            raise ValueError(f"`eta` must lie in (0, 1], got {eta}")
        self.eta = eta

    def _next_t(self, t: Tensor, dt: Tensor) -> Tensor:
        t_next = t + dt
        if bool((t_next <= 0).any()):
            raise ValueError(
                "CPS has zero noise on a step that ends at t = 0; `t + dt` must be > 0"
            )
        return t_next

    def std(self, t: Tensor, dt: Tensor) -> Tensor:
        return self._next_t(t, dt) * math.sin(self.eta * math.pi / 2)

    def _noise_coef(self, t: Tensor, dt: Tensor) -> Tensor:
        t_next = self._next_t(t, dt)
        return torch.sqrt(t_next**2 - self.std(t, dt) ** 2)

    def mean(self, sample: Tensor, velocity: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        t_ = _per_sample(t, sample)
        t_next = _per_sample(self._next_t(t, dt), sample)
        coef = _per_sample(self._noise_coef(t, dt), sample)
        x0 = sample - t_ * velocity
        eps = sample + (1 - t_) * velocity
        return x0 * (1 - t_next) + eps * coef

    def velocity_slope(self, t: Tensor, dt: Tensor) -> Tensor:
        return -t * (1 - (t + dt)) + (1 - t) * self._noise_coef(t, dt)

    def log_prob(self, next_sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return -_reduce_dims((next_sample.detach().to(mean.dtype) - mean) ** 2)


def make_kernel(
    sde: str, eta: float | None = None, sigma_max: float | None = None
) -> TransitionKernel:
    """Build a kernel by name: ``"flow"`` (Flow-SDE), ``"dance"`` (Dance-SDE) or ``"cps"``.

    ``eta`` defaults to each upstream's default noise level (0.7, 0.3, 0.7).
    """
    if sde == "flow":
        return FlowSDE(0.7 if eta is None else eta, sigma_max=sigma_max)
    if sde == "dance":
        return DanceSDE(0.3 if eta is None else eta)
    if sde == "cps":
        return CPS(0.7 if eta is None else eta)
    raise ValueError(f"`sde` must be 'flow', 'dance' or 'cps', got {sde!r}")
