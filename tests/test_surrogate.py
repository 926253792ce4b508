"""Clipped surrogates zero exactly the gradients they should."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import AsymmetricClip, DualClip, NoClip, PPOClip
from regclip.surrogate import MAX_LOG_RATIO, bounded_exp
from strategies import seeds

SURROGATES = {
    "ppo": lambda: PPOClip(0.1),
    "asymmetric": lambda: AsymmetricClip(0.05, 0.2),
    "dual": lambda: DualClip(0.1, dual=1.5),
    "none": NoClip,
}


def expected_gradient_mask(name, ratio, adv):
    """Where a correct surrogate must have a non-zero gradient d loss / d log_ratio."""
    if name == "none":
        return adv != 0
    low, high = {"ppo": (0.1, 0.1), "asymmetric": (0.05, 0.2), "dual": (0.1, 0.1)}[name]
    live = ((adv > 0) & (ratio <= 1 + high)) | ((adv < 0) & (ratio >= 1 - low))
    if name == "dual":
        live &= ~((adv < 0) & (ratio > 1.5))
    return live


@given(seed=seeds, name=st.sampled_from(sorted(SURROGATES)))
def test_surrogate_gradient_is_zero_exactly_where_clipping_binds(seed, name):
    gen = torch.Generator().manual_seed(seed)
    log_ratio = (0.6 * torch.randn(64, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(64, generator=gen, dtype=torch.float64)
    adv[::7] = 0.0
    out = SURROGATES[name]()(log_ratio, adv)
    (grad,) = torch.autograd.grad(out.loss.sum(), log_ratio)
    ratio = log_ratio.detach().exp()
    live = expected_gradient_mask(name, ratio, adv)
    assert torch.equal(grad != 0, live)
    torch.testing.assert_close(grad[live], (-adv * ratio)[live])
    assert torch.equal(out.clipped, ~live & (adv != 0))


@given(seed=seeds)
def test_dual_clip_caps_negative_advantage_loss(seed):
    gen = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(32, generator=gen, dtype=torch.float64)
    adv = -torch.rand(32, generator=gen, dtype=torch.float64)
    out = DualClip(0.1, dual=2.0)(log_ratio, adv)
    assert bool((out.loss <= -2.0 * adv + 1e-12).all())
    assert torch.equal(out.dual_clipped, log_ratio.exp() > 2.0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("args", "match"),
    [((0.0, 0.1), "low"), ((0.1, -1.0), "high"), ((1.0, 0.1), "low"), ((NAN, 0.1), "low"),
     ((0.1, NAN), "high"), ((0.1, INF), "high"), ((-INF, 0.1), "low"), ((0.1, 1e9), "high")],
)  # fmt: skip
def test_clip_ranges_are_validated_nan_and_inf_included(args, match):
    with pytest.raises(ValueError, match=match):
        AsymmetricClip(*args)


@pytest.mark.parametrize("dual", [NAN, INF, 1.0, 1e9])
def test_dual_bound_is_validated_nan_and_inf_included(dual):
    with pytest.raises(ValueError, match="`dual`"):
        DualClip(0.1, dual=dual)


@given(seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_bounded_exp_is_exp_bit_for_bit_below_the_bound_and_its_tangent_above(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    below = (MAX_LOG_RATIO * (2 * torch.rand(256, generator=gen) - 1.5)).to(dtype)
    below = torch.cat([below, torch.tensor([MAX_LOG_RATIO], dtype=dtype)]).requires_grad_()
    weights = torch.randn(below.shape, generator=gen).to(dtype)
    ours = bounded_exp(below)
    reference = torch.exp(below)
    assert torch.equal(ours, reference)
    (g_ours,) = torch.autograd.grad((weights * ours).sum(), below)
    (g_ref,) = torch.autograd.grad((weights * reference).sum(), below)
    assert torch.equal(g_ours, g_ref)
    above = (MAX_LOG_RATIO + 1e4 * torch.rand(64, generator=gen)).to(dtype).requires_grad_()
    value = bounded_exp(above)
    (grad,) = torch.autograd.grad(value.sum(), above)
    at_bound = torch.exp(torch.tensor(MAX_LOG_RATIO, dtype=dtype))
    torch.testing.assert_close(value, at_bound * (1 + above.detach() - MAX_LOG_RATIO))
    torch.testing.assert_close(grad, at_bound.expand_as(grad))


HUGE = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@given(
    seed=seeds,
    extremes=st.lists(HUGE, min_size=1, max_size=16),
    name=st.sampled_from(sorted(SURROGATES)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_huge_log_ratios_give_finite_losses_and_exactly_zero_gradient_where_clipped(
    seed, extremes, name, dtype
):
    """Log-ratios up to +/-1e4 (exp overflows past ~88.7 in float32, ~709.8 in float64):
    clipping decisions are exp(r)'s, clipped samples get gradient exactly 0, nothing is NaN."""
    gen = torch.Generator().manual_seed(seed)
    log_ratio = torch.cat([torch.tensor(extremes), torch.randn(16, generator=gen)])
    log_ratio = log_ratio.to(dtype).requires_grad_()
    adv = torch.randn(log_ratio.shape, generator=gen).to(dtype)
    adv[::5] = 0.0
    out = SURROGATES[name]()(log_ratio, adv)
    (grad,) = torch.autograd.grad(out.loss.sum(), log_ratio)
    assert bool(torch.isfinite(out.loss).all() and torch.isfinite(out.ratio).all())
    assert bool(torch.isfinite(grad).all())
    exact = log_ratio.detach().double().exp()  # inf where it overflows: decisions still hold
    live = expected_gradient_mask(name, exact, adv.double())
    assert torch.equal(out.clipped, ~live & (adv != 0))
    assert bool((grad[out.clipped] == 0).all())
    small = log_ratio.detach() <= MAX_LOG_RATIO
    torch.testing.assert_close(grad[live & small], (-adv * exact.to(dtype))[live & small])


def test_no_clip_continues_linearly_past_the_bound():
    """NoClip at r = 1e4: the ratio's tangent at r = MAX_LOG_RATIO, not an overflow."""
    log_ratio = torch.tensor([1e4, -1e4, 5.0], requires_grad=True)
    adv = torch.tensor([-2.0, 3.0, 1.0])
    out = NoClip()(log_ratio, adv)
    (grad,) = torch.autograd.grad(out.loss.sum(), log_ratio)
    at_bound = torch.exp(torch.tensor(MAX_LOG_RATIO))
    expected_ratio = torch.stack([at_bound * (1 + 1e4 - MAX_LOG_RATIO), torch.tensor(0.0),
                                  torch.exp(torch.tensor(5.0))])  # fmt: skip
    torch.testing.assert_close(out.ratio, expected_ratio)
    torch.testing.assert_close(out.loss, -adv * expected_ratio)
    torch.testing.assert_close(grad, -adv * torch.stack([at_bound, torch.tensor(0.0),
                                                         torch.exp(torch.tensor(5.0))]))  # fmt: skip
