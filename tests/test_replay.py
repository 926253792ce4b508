"""Seeded rollout noise (regclip.replay): the guard without stored old means is exact, and
16-bit stored old means are not."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regclip import FlowSDE, presets, replay
from regclip.batch import LowPrecisionMeanWarning, LowPrecisionOldMeanWarning
from strategies import make_rollout, seeds

SHAPE = (4, 8, 8)


@settings(max_examples=10)
@given(seed=seeds, step=st.integers(0, 50))
def test_step_noise_is_deterministic_per_sample_and_step(seed: int, step: int) -> None:
    sample_seeds = replay.new_seeds(5, torch.Generator().manual_seed(seed))
    noise = replay.step_noise(sample_seeds, step, SHAPE)
    assert noise.shape == (5, *SHAPE)
    assert torch.equal(noise, replay.step_noise(sample_seeds, step, SHAPE))
    # a sample's noise does not depend on the batch it is drawn in
    order = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(noise[order], replay.step_noise(sample_seeds[order], step, SHAPE))
    # other steps, other samples: unrelated streams
    other_step = replay.step_noise(sample_seeds, step + 1, SHAPE)
    assert not torch.isclose(noise, other_step).any(dim=tuple(range(1, noise.ndim))).all()
    assert abs(torch.corrcoef(torch.stack([noise[0].flatten(), noise[1].flatten()]))[0, 1]) < 0.3


def test_step_seed_rejects_negative_steps_and_step_lists_of_wrong_length() -> None:
    with pytest.raises(ValueError, match="step"):
        replay.step_seed(3, -1)
    with pytest.raises(ValueError, match="steps"):
        replay.step_noise([1, 2, 3], [0, 1], SHAPE)


@pytest.mark.parametrize(
    ("bad_seeds", "error"),
    [([1.2], TypeError), ([1.9], TypeError), (torch.tensor([1.0]), TypeError), ([True], TypeError),
     ([2**64], ValueError), ([-1], ValueError), (["7"], TypeError)],
)  # fmt: skip
def test_seeds_that_are_not_integers_in_0_to_2_pow_64_are_refused(bad_seeds, error) -> None:
    """1.2 and 1.9 used to truncate onto seed 1's noise, 2**64 to wrap onto seed 0's."""
    with pytest.raises(error, match="`seeds`"):
        replay.step_noise(bad_seeds, 0, SHAPE)


@pytest.mark.parametrize("steps", [0.5, [0, 1.5], 2**64, torch.tensor([0.0, 1.0])])
def test_steps_that_are_not_integers_in_range_are_refused(steps) -> None:
    with pytest.raises((TypeError, ValueError), match="`steps`"):
        replay.step_noise([1, 2], steps, SHAPE)


def test_integer_seeds_of_every_kind_give_the_same_noise() -> None:
    np = pytest.importorskip("numpy")
    reference = replay.step_noise([5, 2**64 - 1], [0, 3], SHAPE)
    for given_seeds in (np.array([5, 2**64 - 1], dtype=np.uint64), [np.int64(5), 2**64 - 1]):
        assert torch.equal(replay.step_noise(given_seeds, torch.tensor([0, 3]), SHAPE), reference)
    assert not torch.equal(reference[1], replay.step_noise([0], 3, SHAPE)[0])


@settings(max_examples=10)
@given(seed=seeds)
def test_regenerated_old_mean_equals_the_rollout_mean(seed: int) -> None:
    """Rollout in float32 with seeded noise; a training batch mixing steps regenerates each
    sample's noise bit for bit and its old mean to within rounding of ``next_sample``."""
    batch, steps = 4, 6
    gen = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(1.0, 0.0, steps + 1) * 0.9 + 0.05
    kernel = FlowSDE.from_sigmas(torch.cat([torch.ones(1), sigmas[1:]]), eta=0.7)
    sample_seeds = replay.new_seeds(batch, gen)
    x = torch.randn(batch, *SHAPE, generator=gen)
    stored = []
    for j in range(steps):
        velocity = torch.randn(batch, *SHAPE, generator=gen)
        noise = replay.step_noise(sample_seeds, j, SHAPE)
        out = kernel.step(
            x, velocity, sigmas[j].item(), (sigmas[j + 1] - sigmas[j]).item(), noise=noise
        )
        stored.append((out.mean, out.next_sample, out.std, noise))
        x = out.next_sample
    train_steps = torch.randint(0, steps, (batch,), generator=gen)
    pick = [stored[int(j)] for j in train_steps]
    old_mean = torch.stack([p[0][i] for i, p in enumerate(pick)])
    next_sample = torch.stack([p[1][i] for i, p in enumerate(pick)])
    std = torch.stack([p[2][i] for i, p in enumerate(pick)])
    noise = torch.stack([p[3][i] for i, p in enumerate(pick)])
    regenerated_noise = replay.step_noise(sample_seeds, train_steps, SHAPE)
    assert torch.equal(regenerated_noise, noise)
    regenerated = replay.old_mean_from_noise(next_sample, std, regenerated_noise)
    eps = torch.finfo(torch.float32).eps
    bound = 2 * eps * (next_sample.abs() + (std.view(-1, 1, 1, 1) * noise).abs())
    assert ((regenerated - old_mean).abs() <= bound).all()


@settings(max_examples=12)
@given(seed=seeds, name=st.sampled_from(["flow_grpo", "mean_revised", "ratio_norm", "grpo_guard"]))
def test_loss_with_noise_equals_loss_with_stored_old_mean(seed: int, name: str) -> None:
    kernel = FlowSDE(0.7)
    r = make_rollout(seed)
    old = kernel.step(r.sample, r.velocity_old, r.t, r.dt, noise=r.noise)
    mean, std = kernel.evaluate(r.sample, r.velocity, r.t, r.dt)
    loss_fn = presets.from_name(name, clip_range=1e-2)
    common = dict(
        advantages=r.advantages, mean=mean, next_sample=old.next_sample, std=std, dt=r.dt, t=r.t
    )
    stored = loss_fn(**common, old_mean=old.mean)
    (grad_stored,) = torch.autograd.grad(stored.loss, r.velocity, retain_graph=True)
    regenerated = loss_fn(**common, noise=r.noise)
    (grad_regenerated,) = torch.autograd.grad(regenerated.loss, r.velocity)
    torch.testing.assert_close(regenerated.log_ratio, stored.log_ratio, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(regenerated.loss, stored.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_regenerated, grad_stored, rtol=1e-9, atol=1e-12)


def test_noise_replaces_old_mean_and_needs_next_sample() -> None:
    loss_fn = presets.grpo_guard()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    kw = dict(advantages=torch.ones(2), mean=x, std=0.1, dt=-0.1)
    with pytest.raises(ValueError, match="noise"):
        loss_fn(**kw, old_mean=x, next_sample=x, noise=x)
    with pytest.raises(ValueError, match="noise"):
        loss_fn(**kw, noise=x)
    with pytest.raises(ValueError, match="noise"):
        loss_fn(**kw, next_sample=x, noise=torch.zeros(2, 3))


def _first_step_batch(
    std: torch.Tensor, dim: tuple[int, ...], seed: int
) -> dict[str, torch.Tensor]:
    """The first optimizer step on a rollout: the current mean equals the rollout mean."""
    gen = torch.Generator().manual_seed(seed)
    batch = std.shape[0]
    old_mean = torch.randn(batch, *dim, generator=gen)  # unit-scale latents (SD3, Flux)
    noise = torch.randn(batch, *dim, generator=gen)
    next_sample = old_mean + std.view(-1, 1, 1, 1) * noise
    return dict(old_mean=old_mean, noise=noise, next_sample=next_sample, mean=old_mean.clone())


def test_bf16_old_means_bias_the_first_step_ratio_past_the_clip_range() -> None:
    """With ``e = mu_old - bf16(mu_old)``, at the rollout point (``mu = mu_old``) exactly

        vanilla   log rho = mean(eps e) / s + mean(e^2) / (2 s^2)
        RatioNorm r       = mean(eps e)     + mean(e^2) / s

    instead of 0. bf16 keeps 8 significant bits: for unit-scale latents the rounding error
    has rms ~1.7e-3 and mean(e^2) ~ 2.8e-6, so at the small transition stds of late steps (s = 0.03..0.1)
    the bias exceeds Flow-GRPO's clip 1e-4 and GRPO-Guard's 2e-6: clipping fires on a
    sample that has not moved. fp32 stored means, or the regenerated noise, give 0.
    """
    batch, dim = 32, (16, 32, 32)
    std = torch.logspace(-1.5, -1.0, batch)  # s from 0.03 to 0.1
    inputs = _first_step_batch(std, dim, seed=0)
    old_bf16 = inputs["old_mean"].bfloat16()
    e = (inputs["old_mean"].double() - old_bf16.double()).flatten(1)
    eps = inputs["noise"].double().flatten(1)
    s = std.double()
    bias_sq = (e**2).mean(1)
    assert 1e-6 < bias_sq.mean() < 5e-6  # bf16 rounding of unit-scale values
    common = dict(
        advantages=torch.ones(batch),
        mean=inputs["mean"],
        next_sample=inputs["next_sample"],
        std=std,
        dt=-0.1,
    )
    for preset, clip, predicted in (
        ("flow_grpo", 1e-4, (eps * e).mean(1) / s + bias_sq / (2 * s**2)),
        ("grpo_guard", 2e-6, (eps * e).mean(1) + bias_sq / s),
    ):
        loss_fn = presets.from_name(preset, clip_range=clip)
        exact = loss_fn(**common, old_mean=inputs["old_mean"])
        regenerated = loss_fn(**common, noise=inputs["noise"])
        with pytest.warns(LowPrecisionOldMeanWarning):
            low = loss_fn(**common, old_mean=old_bf16)
        assert exact.log_ratio.abs().max() == 0
        assert regenerated.log_ratio.abs().max() < 0.01 * clip
        assert regenerated.metrics["clip/frac"] == 0
        torch.testing.assert_close(low.log_ratio.double(), predicted, rtol=1e-3, atol=1e-3 * clip)
        bias = bias_sq / (2 * s**2) if preset == "flow_grpo" else bias_sq / s
        assert (bias > clip).float().mean() > 0.5, preset
        assert low.metrics["clip/pos_high"] > 0.25, preset


def test_bf16_current_means_flip_clip_decisions_and_warn() -> None:
    """The current mean in bf16: its rounding error (rms ~1.7e-3 for unit-scale latents)
    dwarfs one update's drift (here rms 5e-4, a RatioNorm log-ratio of a few 2e-6 clip
    ranges), so the log-ratio follows the rounding: a third of the clip decisions flip
    against float32 here and the gradient turns away from float32's. The loss warns; float32 means (the kernels' ``evaluate``
    upcasts) do not."""
    batch, dim = 64, (16, 32, 32)
    std = torch.logspace(-1.5, -1.0, batch)
    inputs = _first_step_batch(std, dim, seed=2)
    gen = torch.Generator().manual_seed(3)
    drift = 5e-4 * torch.randn(batch, *dim, generator=gen)
    common = dict(
        advantages=torch.randn(batch, generator=gen), old_mean=inputs["old_mean"],
        next_sample=inputs["next_sample"], std=std, dt=-0.1,
    )  # fmt: skip
    loss_fn = presets.grpo_guard(clip_range=2e-6)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        mean = (inputs["old_mean"] + drift).to(dtype).requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = loss_fn(**common, mean=mean)
        (grad,) = torch.autograd.grad(out.loss, mean)
        assert [w.category for w in caught] == [LowPrecisionMeanWarning] * (dtype != torch.float32)
        results.append((out.clipped, grad.double().flatten()))
    (clipped32, grad32), (clipped16, grad16) = results
    assert (clipped32 != clipped16).double().mean() > 0.25
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) < 0.9


def test_fp32_old_means_do_not_warn() -> None:
    inputs = _first_step_batch(torch.full((2,), 0.1), (4, 4, 4), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        presets.grpo_guard()(
            advantages=torch.ones(2), mean=inputs["mean"], old_mean=inputs["old_mean"],
            next_sample=inputs["next_sample"], std=0.1, dt=-0.1,
        )  # fmt: skip
