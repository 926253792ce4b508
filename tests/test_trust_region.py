"""KLMask: the mask is its definition, masked samples get exactly zero gradient and the
others exactly -w A d rho / B, and the defaults are verl-omni's FlowDPPOLoss formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import GuardedPPOLoss, KLMask, TransitionBatch, presets, transition_kl
from regclip.kernels import gaussian_log_prob, make_kernel
from strategies import kernel_names, loss_inputs, make_rollout, seeds

NORMALIZERS = st.sampled_from(["identity", "ratio_norm", "velocity"])
REWEIGHTS = st.sampled_from(["uniform", "auto", "inverse_dt", "equalizing"])


def _inputs(seed: int, kernel_name: str, drift: float):
    kernel = make_kernel(kernel_name)
    t = torch.linspace(0.2, 0.9, 12, dtype=torch.float64)
    r = make_rollout(seed, batch=12, t=t, dt=-0.05, drift=drift)
    return kernel, r, loss_inputs(kernel, r)


def _reference_kl(inputs) -> torch.Tensor:
    """The bound's equation: mean_D((mean - old_mean)^2) / (2 s^2), per sample."""
    delta = inputs["mean"].detach() - inputs["old_mean"]
    return (delta**2).mean(dim=(1, 2, 3)) / (2 * inputs["std"] ** 2)


def _distributions_kl(inputs) -> torch.Tensor:
    """Per-dimension KL of N(mean, s^2) from N(old_mean, s^2) by torch.distributions."""
    s = inputs["std"].view(-1, 1, 1, 1)
    p = torch.distributions.Normal(inputs["mean"].detach(), s)
    q = torch.distributions.Normal(inputs["old_mean"], s)
    return torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))


def _loss(kernel, normalizer, reweight, bound, asymmetric) -> GuardedPPOLoss:
    return presets.kl_mask(
        bound=bound,
        kernel=kernel,
        normalizer=normalizer,
        reweight=reweight,
        asymmetric=asymmetric,
        adv_clip=None,
    )


@given(
    seed=seeds,
    kernel_name=kernel_names,
    drift=st.floats(1e-3, 0.5),
    quantile=st.floats(0.0, 1.0),
    asymmetric=st.booleans(),
    normalizer=NORMALIZERS,
)
def test_mask_equals_the_bounds_definition(
    seed, kernel_name, drift, quantile, asymmetric, normalizer
):
    """M = [KL > bound] and (asymmetric) the ratio moved along the advantage; the bound is
    drawn as a quantile of the batch's KLs so both sides occur."""
    kernel, _, inputs = _inputs(seed, kernel_name, drift)
    kl = _reference_kl(inputs)
    torch.testing.assert_close(transition_kl(_batch(inputs)), kl, rtol=1e-12, atol=0)
    # the equation is the exact Gaussian KL per dimension (distributions rounds 1 + x - 1)
    torch.testing.assert_close(_distributions_kl(inputs), kl, rtol=1e-9, atol=1e-15)
    bound = float(torch.quantile(kl, quantile)) * (1 + 1e-9) + 1e-300
    out = _loss(kernel, normalizer, "uniform", bound, asymmetric)(**inputs)
    adv, rho = inputs["advantages"], out.ratio.detach()
    expected = kl > bound
    if asymmetric:
        expected &= ((adv > 0) & (rho > 1)) | ((adv < 0) & (rho < 1))
    assert torch.equal(out.clipped, expected)
    torch.testing.assert_close(out.metrics["clip/frac"], expected.double().mean().item())


def _batch(inputs, kernel=None):
    return TransitionBatch.build(**inputs, kernel=kernel)


@given(
    seed=seeds,
    kernel_name=kernel_names,
    drift=st.floats(1e-3, 0.5),
    quantile=st.floats(0.1, 0.9),
    normalizer=NORMALIZERS,
    reweight=REWEIGHTS,
    asymmetric=st.booleans(),
)
def test_gradient_is_zero_exactly_on_masked_samples_and_minus_a_drho_elsewhere(
    seed, kernel_name, drift, quantile, normalizer, reweight, asymmetric
):
    kernel, r, inputs = _inputs(seed, kernel_name, drift)
    bound = float(torch.quantile(_reference_kl(inputs), quantile))
    loss_fn = _loss(kernel, normalizer, reweight, bound, asymmetric)
    out = loss_fn(**inputs)
    (grad,) = torch.autograd.grad(out.loss, r.velocity, retain_graph=True)
    masked = out.clipped
    assert bool((grad[masked] == 0).all())
    # reference: the unmasked samples' -w A rho / B through the same normalizer
    batch = _batch(inputs, kernel)
    log_ratio = loss_fn.normalizer(batch)
    weight = loss_fn.reweighter(batch, loss_fn.normalizer)
    live = (~masked).double()
    ref = (live * weight * -inputs["advantages"] * torch.exp(log_ratio)).sum() / 12
    (expected,) = torch.autograd.grad(ref, r.velocity, retain_graph=True)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-300)
    assert bool((grad[~masked].flatten(1).abs().sum(1) > 0).all())


@given(seed=seeds, drift=st.floats(1e-3, 0.3), quantile=st.floats(0.0, 1.0))
def test_defaults_are_the_flow_dppo_formula_on_log_probs(seed, drift, quantile):
    """Vanilla ratio from upstream log-probs, KL = mean_D((mu - mu_old)^2) / (2 s^2),
    loss = mean(where(keep, -A rho, 0)) with keep = not (KL > bound and moving away)."""
    _, _, inputs = _inputs(seed, "flow", drift)
    mean, old, x, s = inputs["mean"], inputs["old_mean"], inputs["next_sample"], inputs["std"]
    adv = inputs["advantages"]
    rho = torch.exp(gaussian_log_prob(x, mean, s) - gaussian_log_prob(x, old, s))
    kl = ((mean.detach() - old) ** 2).mean(dim=(1, 2, 3)) / (2 * s**2)
    bound = float(torch.quantile(kl, quantile)) * (1 + 1e-9) + 1e-300
    away = ((rho > 1) & (adv > 0)) | ((rho < 1) & (adv < 0))
    keep = ~((kl > bound) & away)
    expected = torch.where(keep, -adv * rho, torch.zeros_like(rho)).mean()
    got = presets.kl_mask(bound=bound, adv_clip=None)(**inputs)
    torch.testing.assert_close(got.loss, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(got.clipped, ~keep)


def test_missing_means_are_named_and_bound_is_checked():
    kernel, _, inputs = _inputs(0, "flow", 0.1)
    loss = GuardedPPOLoss(surrogate=KLMask(1e-5), kernel=kernel)
    no_old = {k: v for k, v in inputs.items() if k not in ("old_mean", "mean", "next_sample")}
    no_old["log_prob"] = no_old["old_log_prob"] = torch.zeros(12, dtype=torch.float64)
    with pytest.raises(ValueError, match="`mean`, `old_mean`"):
        loss(**no_old)
    with pytest.raises(ValueError, match="bound"):
        KLMask(0.0)
    with pytest.raises(ValueError, match="normalizer"):
        presets.kl_mask(normalizer="other")  # type: ignore[arg-type]
    assert isinstance(presets.from_name("kl_mask", bound=1e-4).surrogate, KLMask)


@given(seed=seeds, drift=st.floats(1e-3, 0.2), dims=st.sampled_from([16, 256, 4096]))
def test_vanilla_log_ratio_is_a_noisy_estimate_of_minus_the_kl(seed, drift, dims):
    """Fixed means, rollout draws x = mu_old + s eps: the vanilla log-ratio has mean -KL_i
    and std sqrt(2 KL_i / D), the noise Flow-DPPO's mask avoids."""
    gen = torch.Generator().manual_seed(seed)
    n, s = 4000, 0.3
    old = torch.randn(1, dims, generator=gen, dtype=torch.float64).expand(n, dims)
    mean = old + drift * s * torch.randn(1, dims, generator=gen, dtype=torch.float64)
    x = old + s * torch.randn(n, dims, generator=gen, dtype=torch.float64)
    std = torch.full((n,), s, dtype=torch.float64)
    log_ratio = gaussian_log_prob(x, mean, std) - gaussian_log_prob(x, old, std)
    kl = transition_kl(
        TransitionBatch.build(
            advantages=std, std=s, dt=-0.1, mean=mean, old_mean=old, next_sample=x
        )
    )[0]
    sd = torch.sqrt(2 * kl / dims)
    torch.testing.assert_close(log_ratio.mean(), -kl, rtol=0, atol=float(5 * sd / n**0.5))
    torch.testing.assert_close(log_ratio.std(), sd, rtol=0.1, atol=0)


@pytest.mark.parametrize("bound", [float("nan"), float("inf"), 0.0, -1e-5])
def test_kl_bound_must_be_finite_and_positive(bound):
    with pytest.raises(ValueError, match="`bound`"):
        KLMask(bound)
