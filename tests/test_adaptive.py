"""AdaptiveClip: converges to its target, keeps ranges positive, equals PPO clip when
frozen, resumes exactly from its state_dict, and keeps ranks in step under gloo."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regclip import AdaptiveClip, GuardedPPOLoss, PPOClip, RatioNorm, TransitionBatch, presets
from regclip.kernels import make_kernel
from regclip.reweight import EqualizingWeight
from strategies import kernel_names, loss_inputs, make_rollout, seeds
from test_distributed import run_on_two_ranks

TIMES = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)


def _batch(t: torch.Tensor) -> TransitionBatch:
    """A batch carrying only what the surrogate reads (its ``t``)."""
    ones = torch.ones_like(t)
    return TransitionBatch(advantages=ones, std=ones, dt=-0.1 * ones, t=t)


def _stream(gen: torch.Generator, scales: torch.Tensor, per_step: int):
    """Log-ratios (T * per_step,) ~ N(0, scale_k^2) at each step k, their t and advantages."""
    steps = torch.arange(scales.numel()).repeat_interleave(per_step)
    log_ratio = torch.randn(steps.numel(), generator=gen, dtype=torch.float64) * scales[steps]
    adv = torch.randn(steps.numel(), generator=gen, dtype=torch.float64)
    return log_ratio, adv, TIMES[steps]


def _feed(clip: AdaptiveClip, gen: torch.Generator, scales: torch.Tensor, per_step: int) -> None:
    log_ratio, adv, t = _stream(gen, scales, per_step)
    clip(log_ratio, adv, batch=_batch(t))


@settings(max_examples=10)
@given(seed=seeds, target=st.floats(0.08, 0.4))
def test_controller_converges_to_its_target_on_a_stationary_stream(seed, target):
    """Per-step log-ratio scales spanning 4 decades, init far off: after 150 updates the
    fraction outside each step's range (geometric mean of the last 50), measured on fresh
    draws, is the target."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([3e-7, 1e-5, 4e-4, 1e-2], dtype=torch.float64)
    clip = AdaptiveClip(TIMES, target=target, init=1e-4)
    log_ranges = []
    for i in range(150):
        _feed(clip, gen, scales, per_step=512)
        clip.step()
        if i >= 100:
            log_ranges.append(clip.ranges.log())
    eps_k = torch.stack(log_ranges).mean(dim=0).exp()
    log_ratio, _, t = _stream(gen, scales, per_step=20000)
    eps = eps_k[clip.step_index(t)]
    outside = ((torch.exp(log_ratio) - 1).abs() > eps).double().view(4, -1).mean(dim=1)
    assert torch.allclose(outside, torch.full_like(outside, target), atol=0.02), (outside, eps_k)


def test_clipped_statistic_targets_the_zeroed_gradient_fraction():
    """Independent signs of ratio shift and advantage: about half the out-of-range samples
    are clipped, so targeting 0.1 clipped settles near 0.2 out of range."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.full((4,), 1e-3, dtype=torch.float64)
    clip = AdaptiveClip(TIMES, target=0.1, init=1e-4, statistic="clipped")
    for _ in range(300):
        _feed(clip, gen, scales, per_step=2048)
        clip.step()
    assert torch.allclose(clip.observed, torch.full((4,), 0.1, dtype=torch.float64), atol=0.03)
    z = clip.ranges / 1e-3  # eps = z sigma with P(|N| > z) = 0.2: z = 1.28
    assert torch.allclose(z, torch.full_like(z, 1.2816), atol=0.15), z


@given(
    seed=seeds,
    exponents=st.lists(st.floats(-40, 3), min_size=1, max_size=40),
    target=st.floats(1e-3, 0.999),
    gain=st.floats(1e-3, 60.0),
    empty=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_ranges_stay_positive_finite_and_within_bounds(seed, exponents, target, gain, empty):
    """Adversarial streams (log-ratio scales from 1e-40 to 1e3, steps that see nothing,
    huge gains): every range stays finite in [min_range, max_range], hence > 0."""
    gen = torch.Generator().manual_seed(seed)
    clip = AdaptiveClip(TIMES, target=target, gain=gain, init=1e-3, min_range=1e-12)
    for exponent in exponents:
        scales = torch.full((4,), 10.0**exponent, dtype=torch.float64)
        log_ratio, adv, t = _stream(gen, scales, per_step=8)
        keep = ~torch.tensor(empty).repeat_interleave(8)
        if keep.any():
            clip(log_ratio[keep], adv[keep], batch=_batch(t[keep]))
        clip.step()
        assert bool(torch.isfinite(clip.ranges).all())
        assert bool((clip.ranges > 0).all())
        assert bool(((clip.ranges >= 1e-12) & (clip.ranges <= 0.5)).all())
    untouched = torch.tensor(empty)
    assert bool((clip.ranges[untouched] == 1e-3).all())  # steps never seen keep their range


def test_exact_zero_log_ratios_and_eval_mode_are_not_counted():
    clip = AdaptiveClip(TIMES, init=1e-3)
    t = TIMES.repeat(3)
    clip(torch.zeros(12, dtype=torch.float64), torch.ones(12, dtype=torch.float64), batch=_batch(t))
    assert bool((clip.counts == 0).all())
    clip.eval()
    clip(
        torch.full((12,), 0.1, dtype=torch.float64), torch.ones(12, dtype=torch.float64), _batch(t)
    )
    assert bool((clip.counts == 0).all())
    clip.step()
    assert bool((clip.ranges == 1e-3).all()) and bool(torch.isnan(clip.observed).all())


def _mixed_inputs(seed: int, kernel_name: str):
    t = TIMES[torch.tensor([0, 1, 2, 3, 1, 2, 0, 3, 2, 1])].clone()
    t[t == 1.0] = 0.95  # Flow-SDE needs sigma_max at t = 1; nearest entry is still index 0
    kernel = make_kernel(kernel_name)
    r = make_rollout(seed, batch=10, t=t, dt=-0.05, drift=0.3)
    return kernel, r, loss_inputs(kernel, r)


@given(
    seed=seeds,
    kernel_name=kernel_names,
    ranges=st.lists(st.floats(1e-4, 0.3), min_size=4, max_size=4),
)
def test_frozen_ranges_reproduce_ppo_clip_loss_and_gradient(seed, kernel_name, ranges):
    """Per step k, a frozen controller is PPOClip(eps_k): on a one-step batch bit for bit;
    on a mixed batch the loss is sum_k B_k L_k / B of the per-step PPOClip losses."""
    kernel, r, inputs = _mixed_inputs(seed, kernel_name)
    adaptive = AdaptiveClip(TIMES).set_ranges(ranges).freeze()
    adaptive.step()  # frozen: no change even after an update
    loss = GuardedPPOLoss(RatioNorm(), EqualizingWeight(), adaptive, kernel=kernel)
    out = loss(**inputs)
    (grad,) = torch.autograd.grad(out.loss, r.velocity, retain_graph=True)
    index = adaptive.step_index(r.t)
    expected_loss = torch.zeros((), dtype=torch.float64)
    expected_grad = torch.zeros_like(grad)
    for k, eps in enumerate(ranges):
        sel = index == k
        if not sel.any():
            continue
        fixed = GuardedPPOLoss(RatioNorm(), EqualizingWeight(), PPOClip(eps), kernel=kernel)
        sub = {name: value[sel] for name, value in inputs.items()}
        ref = fixed(**sub)
        expected_loss = expected_loss + ref.loss * sel.sum() / sel.numel()
        (g,) = torch.autograd.grad(ref.loss, r.velocity, retain_graph=True)
        expected_grad = expected_grad + g * sel.sum() / sel.numel()
        # a one-step batch: bit-identical loss, gradient and clip decisions
        one = loss(**sub)
        assert torch.equal(one.loss, ref.loss)
        assert torch.equal(one.clipped, ref.clipped)
        (g_one,) = torch.autograd.grad(one.loss, r.velocity, retain_graph=True)
        assert torch.equal(g_one, g)
    assert torch.equal(adaptive.ranges, torch.tensor(ranges, dtype=torch.float64))
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-300)


@given(seed=seeds)
def test_state_dict_round_trip_resumes_exactly(seed):
    """Save mid-stream (counts pending), load into a fresh loss, continue both: identical."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3], dtype=torch.float64)
    a = presets.adaptive_guard(times=TIMES, target=0.2)
    for _ in range(5):
        _feed(a.surrogate, gen, scales, per_step=64)
        a.surrogate.step()
    _feed(a.surrogate, gen, scales, per_step=64)  # pending counts travel too
    b = presets.adaptive_guard(times=TIMES.flip(0), target=0.2, clip_range=0.1)
    b.load_state_dict(a.state_dict())
    assert isinstance(b.surrogate, AdaptiveClip)
    state = gen.get_state()
    for clip in (a.surrogate, b.surrogate):
        gen.set_state(state)
        for _ in range(5):
            clip.step()
            _feed(clip, gen, scales, per_step=64)
        clip.step()
    for name, value in a.surrogate.state_dict().items():
        assert torch.equal(value.nan_to_num(-1), b.surrogate.state_dict()[name].nan_to_num(-1))
    assert {"surrogate.ranges", "surrogate.counts", "surrogate.hits"} <= set(a.state_dict())


@pytest.mark.parametrize("kernel_name", ["flow", "dance", "cps"])
def test_adaptive_guard_composes_with_every_kernel_and_logs_ranges(kernel_name):
    kernel, r, inputs = _mixed_inputs(0, kernel_name)
    loss = presets.from_name("adaptive_guard", kernel=kernel, times=TIMES, target=0.15)
    out = loss(**inputs)
    out.loss.backward()
    assert r.velocity.grad is not None and bool(torch.isfinite(r.velocity.grad).all())
    assert float(loss.surrogate.counts.sum()) == 10
    loss.surrogate.step()
    metrics = loss.surrogate.metrics()
    assert set(metrics) == {f"clip_{n}/{k}" for n in ("range", "observed") for k in range(4)}
    assert all(v.ndim == 0 for v in metrics.values())
    assert set(out.metrics) >= {"clip/frac", "clip/pos_high"}
    bounds = out.clip_bounds[1]
    assert isinstance(bounds, torch.Tensor) and bounds.shape == (10,)


def test_missing_t_is_named():
    kernel, _, inputs = _mixed_inputs(0, "flow")
    del inputs["t"]
    loss = GuardedPPOLoss(RatioNorm(), surrogate=AdaptiveClip(TIMES), kernel=kernel)
    with pytest.raises(ValueError, match="`t`"):
        loss(**inputs)
    with pytest.raises(ValueError, match="times"):
        presets.adaptive_guard()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": 0.0},
        {"target": 1.0},
        {"gain": 0.0},
        {"min_range": 0.0},
        {"max_range": 1.0},
        {"init": 0.9},
        {"statistic": "other"},
    ],
)
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        AdaptiveClip(TIMES, **kwargs)


def _rank_ranges(rank: int) -> torch.Tensor:
    """Each rank sees its own scales (rank 1 ten times larger); returns its ranges."""
    gen = torch.Generator().manual_seed(100 + rank)
    scales = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3], dtype=torch.float64) * 10**rank
    clip = AdaptiveClip(TIMES, target=0.15, init=1e-4)
    for _ in range(20):
        _feed(clip, gen, scales, per_step=32 * (rank + 1))
        clip.step()
    return clip.ranges


def test_ranks_with_different_data_keep_identical_ranges():
    """Two gloo ranks with different local streams end with the same ranges, equal to one
    process that sees both ranks' samples."""
    results = run_on_two_ranks(_rank_ranges)
    r0, r1 = (torch.from_numpy(results[k]) for k in (0, 1))
    assert torch.equal(r0, r1)
    gens = [torch.Generator().manual_seed(100 + k) for k in (0, 1)]
    base = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3], dtype=torch.float64)
    clip = AdaptiveClip(TIMES, target=0.15, init=1e-4)
    for _ in range(20):
        for k in (0, 1):
            _feed(clip, gens[k], base * 10**k, per_step=32 * (k + 1))
        clip.step()
    torch.testing.assert_close(r0, clip.ranges, rtol=1e-14, atol=0)
    assert not torch.equal(r0, torch.full_like(r0, 1e-4))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["adaptive_guard", "kl_mask"])
def test_forward_backward_and_step_never_synchronise_on_cuda(preset):
    """With validation off, a loss call, its backward, the controller update and the
    metric tensors run without a host synchronisation (CUDA sync debug mode 'error')."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, shape = 64, (4, 8, 8)
    t = TIMES[torch.arange(b) % 4].clone().cuda()
    t[t == 1.0] = 0.95
    old = torch.randn(b, *shape, generator=gen, device="cuda", dtype=torch.float64)
    mean = (old + 1e-3 * torch.randn_like(old)).requires_grad_()
    inputs = {
        "advantages": torch.randn(b, generator=gen, device="cuda", dtype=torch.float64),
        "mean": mean,
        "old_mean": old,
        "next_sample": old + 0.1 * torch.randn_like(old),
        "std": torch.full((b,), 0.1, device="cuda", dtype=torch.float64),
        "dt": torch.full((b,), -0.1, device="cuda", dtype=torch.float64),
        "t": t,
    }
    extra = {"times": TIMES} if preset == "adaptive_guard" else {"bound": 1e-5}
    loss = presets.from_name(preset, **extra)
    loss.validate = False
    loss(**inputs)  # first call: the controller's buffers follow the inputs to the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = loss(**inputs)
        out.loss.backward()
        if isinstance(loss.surrogate, AdaptiveClip):
            loss.surrogate.step()
            loss.surrogate.metrics()
        _ = out.metric_tensors
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if isinstance(loss.surrogate, AdaptiveClip):
        assert loss.surrogate.ranges.is_cuda and bool((loss.surrogate.ranges > 0).all())
    assert mean.grad is not None and bool(torch.isfinite(mean.grad).all())


@pytest.mark.parametrize("gain", [float("nan"), float("inf"), -1.0])
def test_gain_must_be_finite_and_positive(gain):
    with pytest.raises(ValueError, match="`gain`"):
        AdaptiveClip(TIMES, gain=gain)


@pytest.mark.parametrize(
    "ranges",
    [0.0, 0.6, float("nan"), float("inf"), [1e-4] * 3 + [0.9], [1e-4] * 3, [[1e-4] * 4]],
)
def test_set_ranges_refuses_what_the_constructor_refuses(ranges):
    """Out of [min_range, max_range] (the constructor's bounds on ``init``), NaN, inf and
    a length other than the schedule's: refused, ranges left untouched."""
    clip = AdaptiveClip(TIMES, init=1e-4, min_range=1e-6, max_range=0.5)
    with pytest.raises(ValueError, match="`ranges`"):
        clip.set_ranges(ranges)
    assert clip.ranges.tolist() == [1e-4] * 4
    assert clip.set_ranges([1e-6, 1e-3, 0.1, 0.5]).ranges.tolist() == [1e-6, 1e-3, 0.1, 0.5]
