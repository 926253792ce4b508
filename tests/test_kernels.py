"""Transition kernels against the upstream formulas and their own identities."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import given
from hypothesis import strategies as st

from regclip import CPS, DanceSDE, FlowSDE, gaussian_log_prob, make_kernel
from strategies import kernel_names, seeds, steps, times


def sd3_sigmas(num_steps: int = 10) -> torch.Tensor:
    """The sigma schedule of diffusers' FlowMatchEulerDiscreteScheduler with SD3's shift 3."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.double()


def flow_grpo_reference(x, v, sigmas, i, eta, noise):
    """Flow-GRPO's SDE step written out from its published equations (per-step sigma)."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    sigma_max = sigmas[1]
    dt = sigma_next - sigma
    denom = sigma_max if sigma == 1 else sigma
    std_dev = eta * torch.sqrt(sigma / (1 - denom))
    mean = (
        x * (1 + std_dev**2 / (2 * sigma) * dt)
        + v * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    s = std_dev * torch.sqrt(-dt)
    nxt = mean + s * noise
    lp = -((nxt - mean) ** 2) / (2 * s**2) - torch.log(s) - math.log(math.sqrt(2 * math.pi))
    return nxt, mean, s, lp.mean(dim=tuple(range(1, lp.ndim)))


def dance_reference(x, v, sigmas, i, eta, noise):
    """DanceGRPO's ``flux_step`` (sde_solver=True) from its published equations."""
    sigma = sigmas[i]
    dsigma = sigmas[i + 1] - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    s = eta * math.sqrt(float(sigma - sigmas[i + 1]))
    nxt = mean + noise * s
    lp = -((nxt - mean) ** 2) / (2 * s**2) - math.log(s) - math.log(math.sqrt(2 * math.pi))
    return nxt, mean, s, lp.mean(dim=tuple(range(1, lp.ndim)))


def cps_reference(x, v, sigmas, i, eta, noise):
    """Flow-GRPO's ``sde_type='cps'`` branch from its published equations."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    s = sigma_next * math.sin(eta * math.pi / 2)
    x0 = x - sigma * v
    eps = x + v * (1 - sigma)
    mean = x0 * (1 - sigma_next) + eps * torch.sqrt(sigma_next**2 - s**2)
    nxt = mean + s * noise
    lp = -((nxt - mean) ** 2)
    return nxt, mean, s, lp.mean(dim=tuple(range(1, lp.ndim)))


@pytest.mark.parametrize(
    ("kernel_factory", "reference", "last"),
    [
        (lambda sig: FlowSDE.from_sigmas(sig, eta=0.7), flow_grpo_reference, 9),
        (lambda sig: DanceSDE(eta=0.3), dance_reference, 9),
        (lambda sig: CPS(eta=0.7), cps_reference, 8),  # CPS has no noise on the last step
    ],
    ids=["flow_sde", "dance_sde", "cps"],
)
def test_kernel_matches_upstream_on_sd3_schedule_including_t_equal_1(
    kernel_factory, reference, last
):
    sigmas = sd3_sigmas(10)
    assert sigmas[0] == 1.0  # the schedule starts at t = 1, where Flow-SDE needs sigma_max
    kernel = kernel_factory(sigmas)
    gen = torch.Generator().manual_seed(0)
    for i in range(last + 1):
        x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        v = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        noise = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        t = sigmas[i].expand(3)
        dt = (sigmas[i + 1] - sigmas[i]).expand(3)
        step = kernel.step(x, v, t, dt, noise=noise)
        nxt, mean, s, lp = reference(x, v, sigmas, i, kernel.eta, noise)
        torch.testing.assert_close(step.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step.next_sample, nxt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step.std, torch.as_tensor(s, dtype=torch.float64).expand(3))
        torch.testing.assert_close(step.log_prob, lp, rtol=1e-10, atol=1e-10)


def test_flow_sde_at_t_equal_1_without_sigma_max_names_the_fix():
    with pytest.raises(ValueError, match="sigma_max"):
        FlowSDE(0.7).step(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, -0.1)


@given(seed=seeds, t=times, h=steps, name=kernel_names)
def test_velocity_slope_is_the_derivative_of_the_mean(seed, t, h, name):
    """mu is affine in v with slope c_t: mu(v + u) - mu(v) = c_t u exactly."""
    dt = -min(h, t - 0.01)
    kernel = make_kernel(name)
    gen = torch.Generator().manual_seed(seed)
    x, v, u = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    mu_v, _ = kernel.evaluate(x, v, t, dt)
    mu_vu, _ = kernel.evaluate(x, v + u, t, dt)
    slope = kernel.velocity_slope(
        torch.full((2,), t, dtype=torch.float64), torch.full((2,), dt, dtype=torch.float64)
    )
    torch.testing.assert_close(mu_vu - mu_v, slope[:, None] * u, rtol=1e-9, atol=1e-12)


@given(t=times, eta=st.floats(0.1, 1.5))
def test_flow_sde_velocity_slope_is_one_plus_half_eta_squared_times_dt_below_t_1(t, eta):
    kernel = FlowSDE(eta)
    tt = torch.tensor([t], dtype=torch.float64)
    dt = torch.tensor([-0.01], dtype=torch.float64)
    torch.testing.assert_close(kernel.velocity_slope(tt, dt), (1 + eta**2 / 2) * dt)


@given(seed=seeds, name=kernel_names)
def test_step_draw_is_mean_plus_std_times_noise_and_generator_reproducible(seed, name):
    kernel = make_kernel(name)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(seed))
    v = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(seed + 1))
    a = kernel.step(x, v, 0.5, -0.1, generator=torch.Generator().manual_seed(seed))
    b = kernel.step(x, v, 0.5, -0.1, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(a.next_sample, b.next_sample, rtol=0, atol=0)
    torch.testing.assert_close(a.next_sample, a.mean + a.std[:, None, None] * a.noise)
    rescored = kernel.step(x, v, 0.5, -0.1, next_sample=a.next_sample)
    torch.testing.assert_close(rescored.log_prob, a.log_prob)


def test_gaussian_log_prob_is_the_per_dim_mean_of_the_normal_log_density():
    gen = torch.Generator().manual_seed(3)
    mean, x = (
        torch.randn(5, 7, generator=gen, dtype=torch.float64),
        torch.randn(5, 7, generator=gen, dtype=torch.float64),
    )
    std = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    expected = torch.distributions.Normal(mean, std[:, None]).log_prob(x).mean(dim=1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


@pytest.mark.parametrize(
    ("t", "dt", "match"),
    [(0.5, 0.1, "dt"), (1.5, -0.1, "t"), (0.5, float("nan"), "dt"), (0.0, -0.1, "t")],
)
def test_kernel_rejects_bad_times_naming_the_argument(t, dt, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        DanceSDE().step(torch.zeros(2, 3), torch.zeros(2, 3), t, dt)


def test_kernel_rejects_mismatched_velocity_shape():
    # the jaxtyping shape check (a TypeError) fires first and names the parameters
    with pytest.raises((TypeError, ValueError), match="velocity"):
        DanceSDE().step(torch.zeros(2, 3), torch.zeros(2, 4), 0.5, -0.1)


@pytest.mark.parametrize("std", [0.0, -0.1])
def test_gaussian_log_prob_refuses_a_std_that_is_not_positive(std):
    """std = 0 gave +/-inf: a Gaussian with no spread has no log-density."""
    with pytest.raises(ValueError, match="`std`"):
        gaussian_log_prob(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.1, std]))


@pytest.mark.parametrize("kernel", [FlowSDE, DanceSDE])
@pytest.mark.parametrize("eta", [0.0, -0.5, float("nan"), float("inf")])
def test_sde_noise_level_must_be_finite_and_positive(kernel, eta):
    with pytest.raises(ValueError, match="`eta`"):
        kernel(eta=eta)


@pytest.mark.parametrize("kernel", [FlowSDE(), DanceSDE(), CPS()])
def test_a_step_past_t_equal_0_is_refused_by_every_kernel(kernel):
    """t + dt < 0 ends past the data; Flow-SDE and Dance-SDE used to extrapolate silently."""
    x, v = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t = 0"):
        kernel.step(x, v, torch.tensor([0.5, 0.1]), torch.tensor([-0.1, -0.2]))


@pytest.mark.parametrize("kernel", [FlowSDE(), DanceSDE()])
def test_the_last_step_may_end_exactly_at_t_equal_0(kernel):
    t = torch.tensor([0.2, 0.1])
    out = kernel.step(torch.ones(2, 3), torch.ones(2, 3), t, -t)
    assert bool(torch.isfinite(out.next_sample).all() and torch.isfinite(out.log_prob).all())
