"""Ratio normalizers: the closed forms of docs/theory.md sections 2-3, proved on seeded random
draws."""

from __future__ import annotations

import torch
from hypothesis import given, settings

from regclip import (
    IdentityRatio,
    MeanRevisedRatio,
    RatioNorm,
    TransitionBatch,
    VelocityRatio,
    gaussian_log_prob,
    make_kernel,
)
from strategies import drifts, kernel_names, loss_inputs, make_rollout, seeds, steps, times


def batch_of(kernel, rollout, **extra) -> TransitionBatch:
    inputs = loss_inputs(kernel, rollout)
    return TransitionBatch.build(kernel=kernel, **inputs, **extra)


def per_dim_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@given(seed=seeds, t=times, drift=drifts)
def test_closed_form_log_ratio_equals_difference_of_log_probs(seed, t, drift):
    """log rho = mean(eps Delta) / s - mean(Delta^2) / (2 s^2) = log p_theta - log p_old."""
    kernel = make_kernel("flow")
    r = make_rollout(seed, t=t, dt=-0.05, drift=drift)
    b = batch_of(kernel, r)
    log_ratio = IdentityRatio("closed_form")(b)
    lp_diff = gaussian_log_prob(b.next_sample, b.mean, b.std) - gaussian_log_prob(
        b.next_sample, b.old_mean, b.std
    )
    torch.testing.assert_close(log_ratio, lp_diff, rtol=1e-9, atol=1e-12)
    delta = b.mean - b.old_mean
    s = b.std
    eps = (b.next_sample - b.old_mean) / s[:, None, None, None]
    closed = per_dim_mean(eps * delta) / s - per_dim_mean(delta**2) / (2 * s**2)
    torch.testing.assert_close(log_ratio, closed, rtol=1e-9, atol=1e-12)


@given(seed=seeds, t=times, drift=drifts, name=kernel_names)
def test_antithetic_mean_shows_vanilla_left_shift_and_ratio_norm_centred(seed, t, drift, name):
    """Under the rollout policy E[log rho] = -b_t < 0 once mean != old_mean, E[RatioNorm] = 0.

    Averaging each draw with its antithetic twin (eps -> -eps) computes the expectation over
    the noise exactly, since log rho is affine in eps.
    """
    kernel = make_kernel(name)
    r = make_rollout(seed, t=t, dt=-min(0.1, t / 2), drift=drift)
    b_plus = batch_of(kernel, r)
    r.noise = -r.noise
    b_minus = batch_of(kernel, r)
    vanilla = (IdentityRatio()(b_plus) + IdentityRatio()(b_minus)) / 2
    bias = per_dim_mean((b_plus.mean - b_plus.old_mean) ** 2) / (2 * b_plus.std**2)
    torch.testing.assert_close(vanilla, -bias, rtol=1e-9, atol=1e-15)
    assert bool((vanilla < 0).all())
    centred = (RatioNorm()(b_plus) + RatioNorm()(b_minus)) / 2
    torch.testing.assert_close(centred, torch.zeros_like(centred), rtol=0, atol=1e-15)


@given(seed=seeds, t=times, drift=drifts, name=kernel_names)
def test_stable_form_equals_std_times_log_ratio_plus_bias_in_value_and_gradient(
    seed, t, drift, name
):
    """RatioNorm's closed form mean_D(eps Delta) == s (log_prob - old_log_prob + b_t), the
    public GRPO-Guard formulation, for values and gradients with respect to the velocity."""
    kernel = make_kernel(name)
    r = make_rollout(seed, t=t, dt=-min(0.1, t / 2), drift=drift)
    inputs = loss_inputs(kernel, r)
    lp = gaussian_log_prob(inputs["next_sample"], inputs["mean"], inputs["std"])
    old_lp = gaussian_log_prob(inputs["next_sample"], inputs["old_mean"], inputs["std"])
    b = TransitionBatch.build(kernel=kernel, log_prob=lp, old_log_prob=old_lp, **inputs)
    stable = RatioNorm("closed_form")(b)
    via_log_probs = RatioNorm("log_prob")(b)
    torch.testing.assert_close(stable, via_log_probs, rtol=1e-8, atol=1e-12)
    (g_stable,) = torch.autograd.grad(stable.sum(), r.velocity, retain_graph=True)
    (g_public,) = torch.autograd.grad(via_log_probs.sum(), r.velocity)
    torch.testing.assert_close(g_stable, g_public, rtol=1e-8, atol=1e-12)


@given(seed=seeds, drift=drifts)
def test_mean_revised_is_log_ratio_plus_bias(seed, drift):
    kernel = make_kernel("dance")
    b = batch_of(kernel, make_rollout(seed, drift=drift))
    bias = per_dim_mean((b.mean - b.old_mean) ** 2) / (2 * b.std**2)
    torch.testing.assert_close(MeanRevisedRatio()(b), IdentityRatio()(b) + bias)


@given(seed=seeds, t1=times, t2=times, h=steps, name=kernel_names)
def test_velocity_ratio_and_its_velocity_gradient_do_not_depend_on_the_step(seed, t1, t2, h, name):
    """With the same velocity drift and noise, the velocity-space log-ratio (and its gradient
    with respect to v) is the same at any two steps: mean_D(eps Delta) / |c_t| with
    Delta = c_t (v - v_old) is sign(c_t) mean_D(eps (v - v_old))."""
    kernel = make_kernel(name)
    values, grads = [], []
    for t in (t1, t2):
        r = make_rollout(seed, t=t, dt=-min(h, t / 2))
        b = batch_of(kernel, r)
        value = VelocityRatio()(b)
        (grad,) = torch.autograd.grad(value.sum(), r.velocity)
        values.append(value.abs())
        grads.append(grad.abs())
    torch.testing.assert_close(values[0], values[1], rtol=1e-7, atol=1e-13)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-13)


@settings(max_examples=10)
@given(seed=seeds, t1=times, t2=times, name=kernel_names)
def test_velocity_ratio_spread_is_step_independent_while_ratio_norm_spread_scales_with_slope(
    seed, t1, t2, name
):
    """Spread over 2000 rollout draws of one transition with a fixed velocity drift: the
    velocity-space ratio's std is the same at both steps (= ||v - v_old|| / D), RatioNorm's
    is |c_t| times that."""
    kernel = make_kernel(name)
    gen = torch.Generator().manual_seed(seed)
    n, d = 2000, 64
    x = torch.randn(1, d, generator=gen, dtype=torch.float64).expand(n, d)
    v_old = torch.randn(1, d, generator=gen, dtype=torch.float64).expand(n, d)
    dv = 0.05 * torch.randn(1, d, generator=gen, dtype=torch.float64).expand(n, d)
    noise = torch.randn(n, d, generator=gen, dtype=torch.float64)
    expected = float(dv[0].norm()) / d
    for t in (t1, t2):
        tt = torch.full((n,), t, dtype=torch.float64)
        dt = torch.full((n,), -t / 3, dtype=torch.float64)
        old = kernel.step(x, v_old, tt, dt, noise=noise)
        mean, std = kernel.evaluate(x, v_old + dv, tt, dt)
        b = TransitionBatch.build(
            advantages=torch.zeros(n, dtype=torch.float64),
            mean=mean,
            old_mean=old.mean,
            next_sample=old.next_sample,
            std=std,
            dt=dt,
            t=tt,
            kernel=kernel,
        )
        slope = float(b.slope[0].abs())
        assert abs(float(VelocityRatio()(b).std()) / expected - 1) < 0.08
        assert abs(float(RatioNorm()(b).std()) / (slope * expected) - 1) < 0.08
