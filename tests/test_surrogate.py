"""Clipped surrogates zero exactly the gradients they should."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regclip import AsymmetricClip, DualClip, NoClip, PPOClip
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


@pytest.mark.parametrize(
    ("args", "match"), [((0.0, 0.1), "low"), ((0.1, -1.0), "high"), ((1.0, 0.1), "low")]
)
def test_clip_ranges_are_validated(args, match):
    with pytest.raises(ValueError, match=match):
        AsymmetricClip(*args)
