"""``grpo_guard_official``: the GRPO-Guard authors' loss (batch-mean scale and bias) against
a reference written from its equation, independent of regclip's classes."""

from __future__ import annotations

import math

import pytest
import torch

import regclip
from regclip.fused import static_blocker


def _reference(mean, old_mean, next_sample, sigma_t, dt, adv, clip, adv_clip=5.0):
    """The authors' loss, written out: upstream Gaussian log-probs, S = mean(sqrt(-dt)) *
    mean(sigma_t), bias over the whole batch, loss / mean(sqrt(-dt))^2."""
    dims = tuple(range(1, mean.ndim))
    shape = (-1,) + (1,) * (mean.ndim - 1)
    s = (sigma_t * torch.sqrt(-dt)).view(shape)

    def log_prob(mu):
        value = (
            -((next_sample - mu) ** 2) / (2 * s**2)
            - torch.log(s)
            - math.log(math.sqrt(2 * math.pi))
        )
        return value.mean(dim=dims)

    scale = torch.sqrt(-dt).mean() * sigma_t.mean()
    bias = ((mean - old_mean) ** 2).mean() / (2 * scale**2)
    ratio = torch.exp((log_prob(mean) - log_prob(old_mean) + bias) * scale)
    a = adv.clamp(-adv_clip, adv_clip)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip)).mean()
    return loss / torch.sqrt(-dt).mean() ** 2


def _batch(seed, batch=6, shape=(4, 8, 8), spread=True, same_step=True, drift_size=3e-4):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    old_mean = torch.randn(batch, *shape, generator=g, dtype=f64)
    sigmas = torch.linspace(1.0, 0.0, 11, dtype=f64)
    idx = torch.full((batch,), 3) if same_step else torch.randint(1, 9, (batch,), generator=g)
    t, dt = sigmas[idx], sigmas[idx + 1] - sigmas[idx]
    sigma_t = 0.7 * torch.sqrt(t / (1 - t))
    noise = torch.randn(batch, *shape, generator=g, dtype=f64)
    next_sample = old_mean + (sigma_t * torch.sqrt(-dt)).view(-1, 1, 1, 1) * noise
    size = torch.logspace(-1, 1, batch, dtype=f64) if spread else torch.ones(batch, dtype=f64)
    drift = drift_size * size.view(-1, 1, 1, 1) * torch.randn(batch, *shape, generator=g, dtype=f64)
    mean = (old_mean + drift).requires_grad_(True)
    adv = 2.5 * torch.randn(batch, generator=g, dtype=f64)
    return mean, old_mean, next_sample, sigma_t, dt, t, adv


def _regclip(loss_fn, mean, old_mean, next_sample, sigma_t, dt, t, adv):
    s = sigma_t * torch.sqrt(-dt)
    gauss = regclip.gaussian_log_prob
    return loss_fn(
        advantages=adv,
        mean=mean,
        old_mean=old_mean,
        next_sample=next_sample,
        std=s,
        dt=dt,
        t=t,
        log_prob=gauss(next_sample, mean, s),
        old_log_prob=gauss(next_sample, old_mean, s),
    )


@pytest.mark.parametrize("source", ["log_prob", "closed_form"])
@pytest.mark.parametrize("same_step", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_preset_matches_the_equation(seed, same_step, source):
    mean, old_mean, next_sample, sigma_t, dt, t, adv = _batch(seed, same_step=same_step)
    clip = 2e-6
    expected = _reference(mean, old_mean, next_sample, sigma_t, dt, adv, clip)
    (grad_ref,) = torch.autograd.grad(expected, mean)
    loss_fn = regclip.presets.grpo_guard_official(clip_range=clip, source=source)
    out = _regclip(loss_fn, mean, old_mean, next_sample, sigma_t, dt, t, adv)
    (grad,) = torch.autograd.grad(out.loss, mean)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-7, atol=1e-12 * grad_ref.abs().max())
    assert 0 < out.clipped.sum() < len(adv)  # the comparison covers both branches
    assert loss_fn.normalizer.name == "batch_ratio_norm"


def test_official_and_per_sample_guard_differ_when_drifts_differ():
    """Same step for every sample: equal-size drifts -> nearly the same gradient; drifts
    spanning 0.1x-10x -> the batch-mean bias moves the gradient."""
    cosines = {}
    for spread in (False, True):
        mean, old_mean, next_sample, sigma_t, dt, t, adv = _batch(7, spread=spread, drift_size=0.05)
        grads = []
        for loss_fn in (
            regclip.presets.grpo_guard_official(clip_range=0.5),
            regclip.presets.grpo_guard(clip_range=0.5),
        ):
            out = _regclip(loss_fn, mean, old_mean, next_sample, sigma_t, dt, t, adv)
            grads.append(torch.autograd.grad(out.loss, mean)[0].flatten())
        cosines[spread] = torch.nn.functional.cosine_similarity(*grads, dim=0).item()
    assert cosines[False] > 0.98
    assert cosines[True] < 0.9


def test_official_preset_never_takes_the_fused_path():
    loss_fn = regclip.presets.grpo_guard_official(source="closed_form")
    assert static_blocker(loss_fn) is not None
    with pytest.raises(ValueError, match="fused=True"):
        loss_fn.fused = True
