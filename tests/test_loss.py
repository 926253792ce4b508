"""GuardedPPOLoss and presets: exact reproduction of the published losses, invariances,
metrics and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, target
from hypothesis import strategies as st

import regclip
from regclip import METRIC_NAMES, GuardedPPOLoss, KLPenalty, gaussian_log_prob, make_kernel, presets
from strategies import drifts, kernel_names, loss_inputs, make_rollout, seeds, times


def flow_grpo_upstream_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip):
    """Flow-GRPO ``train_sd3.py``'s policy loss, written from its published equations."""
    adv = torch.clamp(advantages, -adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped))


def grpo_guard_public_loss(
    log_prob, old_log_prob, mean, old_mean, advantages, std, dt, clip_range, adv_clip
):
    """The public GRPO-Guard formula (verl-omni ``GRPOGuardLoss``): bias
    mean_D((mu - mu_old)^2) / (2 s^2), ratio exp((log_ratio + bias) s), loss / -dt."""
    adv = torch.clamp(advantages, -adv_clip, adv_clip)
    bias = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)
    ratio = torch.exp((log_prob - old_log_prob + bias) * std)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped)) / (-dt)


def with_log_probs(inputs):
    lp = gaussian_log_prob(inputs["next_sample"], inputs["mean"], inputs["std"])
    old_lp = gaussian_log_prob(inputs["next_sample"], inputs["old_mean"], inputs["std"]).detach()
    return lp, old_lp


@given(seed=seeds, t=times, drift=drifts, clip=st.sampled_from([1e-4, 1e-2, 0.2]))
def test_flow_grpo_preset_reproduces_upstream_loss_and_gradient(seed, t, drift, clip):
    kernel = make_kernel("flow")
    r = make_rollout(seed, batch=8, t=t, dt=-min(0.1, t / 2), drift=drift)
    r.advantages = r.advantages * 4  # some beyond adv_clip = 5
    inputs = loss_inputs(kernel, r)
    lp, old_lp = with_log_probs(inputs)
    ours = presets.flow_grpo(clip_range=clip)(
        advantages=r.advantages, log_prob=lp, old_log_prob=old_lp, std=inputs["std"], dt=r.dt
    ).loss
    reference = flow_grpo_upstream_loss(lp, old_lp, r.advantages, clip, 5.0)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-15)
    (g_ours,) = torch.autograd.grad(ours, r.velocity, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference, r.velocity)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-15)


@given(seed=seeds, t=times, drift=drifts, clip=st.sampled_from([2e-6, 1e-4, 1e-2]))
def test_grpo_guard_flow_preset_reproduces_public_formula_value_and_gradient(seed, t, drift, clip):
    kernel = make_kernel("flow")
    dt = -min(0.1, t / 2)
    r = make_rollout(seed, batch=8, t=t, dt=dt, drift=drift)
    inputs = loss_inputs(kernel, r)
    lp, old_lp = with_log_probs(inputs)
    # closed form (default) and the log-prob route both reproduce the public formula
    for kwargs in ({}, {"log_prob": lp, "old_log_prob": old_lp}):
        ours = presets.grpo_guard(sde="flow", clip_range=clip)(**inputs, **kwargs).loss
        reference = grpo_guard_public_loss(
            lp,
            old_lp,
            inputs["mean"],
            inputs["old_mean"],
            r.advantages,
            inputs["std"],
            dt,
            clip,
            5.0,
        )
        torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-12)
        (g_ours,) = torch.autograd.grad(ours, r.velocity, retain_graph=True)
        (g_ref,) = torch.autograd.grad(reference, r.velocity, retain_graph=True)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


@given(seed=seeds, drift=drifts, beta=st.floats(0.001, 1.0))
def test_flow_grpo_kl_matches_upstream_sigma_convention(seed, drift, beta):
    """Upstream: beta * mean(mean_D((mu - mu_ref)^2) / (2 sigma_t^2)), sigma_t = s / sqrt(-dt)."""
    kernel = make_kernel("flow")
    r = make_rollout(seed, t=0.7, dt=-0.08, drift=drift)
    inputs = loss_inputs(kernel, r)
    lp, old_lp = with_log_probs(inputs)
    ref_mean = inputs["old_mean"] + 0.01
    out = presets.flow_grpo(kl_coef=beta)(
        advantages=r.advantages,
        log_prob=lp,
        old_log_prob=old_lp,
        std=inputs["std"],
        dt=r.dt,
        mean=inputs["mean"],
        ref_mean=ref_mean,
    )
    sigma = inputs["std"] / (0.08**0.5)
    kl = (((inputs["mean"] - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * sigma**2)).mean()
    expected = flow_grpo_upstream_loss(lp, old_lp, r.advantages, 1e-4, 5.0) + beta * kl
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        torch.tensor(out.metrics["loss/kl"], dtype=torch.float64), kl, rtol=1e-6, atol=0
    )


def test_transition_kl_is_the_true_gaussian_kl_per_dim():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    ref = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    std = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    b = regclip.TransitionBatch.build(
        advantages=torch.zeros(4), std=std, dt=-0.1, mean=mean, ref_mean=ref
    )
    p = torch.distributions.Normal(mean, std[:, None, None])
    q = torch.distributions.Normal(ref, std[:, None, None])
    expected = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2))
    torch.testing.assert_close(KLPenalty(1.0)(b), expected)


@given(seed=seeds, name=kernel_names, preset=st.sampled_from(sorted(presets.PRESETS)))
def test_loss_is_invariant_to_permuting_the_batch(seed, name, preset):
    kernel = make_kernel(name)
    r = make_rollout(seed, batch=7, t=torch.linspace(0.3, 0.9, 7), dt=-0.1, drift=0.05)
    inputs = loss_inputs(kernel, r)
    kwargs = {"sde": name} if preset not in ("flow_grpo", "dance_grpo") else {}
    kwargs |= {"adaptive_guard": {"times": r.t}, "kl_mask": {"bound": 1e-4}}.get(preset, {})
    if preset != "kl_mask":  # the KL mask has a divergence bound, not a clip range
        kwargs["clip_range"] = 1e-3
    loss_fn = presets.from_name(preset, **kwargs)
    out = loss_fn(**inputs)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed))
    permuted = loss_fn(**{k: v[perm] for k, v in inputs.items()})
    torch.testing.assert_close(out.loss, permuted.loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.log_ratio[perm], permuted.log_ratio, rtol=1e-12, atol=1e-15)
    (g,) = torch.autograd.grad(out.loss, r.velocity, retain_graph=True)
    (gp,) = torch.autograd.grad(permuted.loss, r.velocity)
    torch.testing.assert_close(g, gp, rtol=1e-10, atol=1e-15)


def test_metrics_have_stable_names_and_match_their_definitions():
    kernel = make_kernel("flow")
    r = make_rollout(5, batch=64, drift=0.2)
    out = presets.grpo_guard(clip_range=1e-3)(**loss_inputs(kernel, r))
    assert set(out.metrics) == set(METRIC_NAMES) - {"loss/kl"}
    assert all(isinstance(v, float) for v in out.metrics.values())
    ratio, adv = out.ratio.detach(), out.advantages
    pos = adv > 0
    assert out.metrics["clip/pos_high"] == pytest.approx(
        float((ratio[pos] > 1 + 1e-3).double().mean())
    )
    assert out.metrics["clip/neg_low"] == pytest.approx(
        float((ratio[~pos] < 1 - 1e-3).double().mean())
    )
    assert out.metrics["clip/frac"] == pytest.approx(float(out.clipped.double().mean()))
    assert out.metrics["ratio/mean"] == pytest.approx(float(ratio.mean()))
    assert out.metrics["loss"] == pytest.approx(float(out.loss.detach()))


def test_first_step_ratio_is_exactly_one_and_nothing_is_clipped():
    kernel = make_kernel("dance")
    r = make_rollout(11, batch=16, drift=0.0)
    out = presets.grpo_guard(sde="dance")(**loss_inputs(kernel, r))
    assert torch.equal(out.ratio, torch.ones_like(out.ratio))
    assert out.metrics["clip/frac"] == 0.0


BASE = dict(
    advantages=torch.zeros(3),
    mean=torch.zeros(3, 4),
    old_mean=torch.zeros(3, 4),
    next_sample=torch.zeros(3, 4),
    std=torch.full((3,), 0.1),
    dt=torch.full((3,), -0.1),
    t=torch.full((3,), 0.5),
)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"old_mean": torch.zeros(2, 4)}, "`old_mean`"),
        ({"advantages": torch.zeros(4)}, "`advantages`"),  # the latents set the batch
        ({"next_sample": torch.full((3, 4), float("nan"))}, "`next_sample`"),
        ({"std": torch.tensor([0.1, 0.0, 0.1])}, "`std`"),
        ({"dt": torch.full((3,), 0.1)}, "`dt`"),
        ({"dt": torch.zeros(3)}, "`dt`"),
        ({"t": torch.full((2,), 0.5)}, "`t`"),
        ({"advantages": torch.tensor([0.0, float("inf"), 0.0])}, "`advantages`"),
        ({"log_prob": torch.zeros(3)}, "`old_log_prob`"),
        # every range check of the inputs
        ({"t": torch.tensor([0.5, 0.0, 0.5])}, "`t`"),  # t = 0 would give a NaN loss
        ({"t": torch.tensor([0.5, 1.5, 0.5])}, "`t`"),
        ({"t": torch.tensor([0.5, -0.2, 0.5])}, "`t`"),
        ({"t": 0.0}, "`t`"),
        ({"t": torch.tensor([0.5, float("nan"), 0.5])}, "`t`"),
        ({"std": torch.tensor([0.1, -0.1, 0.1])}, "`std`"),
        ({"std": float("inf")}, "`std`"),
        ({"std": torch.full((2,), 0.1)}, "`std`"),
        ({"dt": 0.0}, "`dt`"),
        ({"advantages": torch.zeros(3, 1)}, "`advantages`"),
        ({"advantages": torch.zeros(0)}, "`advantages`"),
        ({"mean": torch.zeros(3, 4, dtype=torch.int64)}, "`mean`"),
        ({"old_mean": torch.zeros(3, 4, dtype=torch.int32)}, "`old_mean`"),
        ({"next_sample": torch.zeros(3, 4, dtype=torch.uint8)}, "`next_sample`"),
        ({"mean": torch.zeros(3)}, "`mean`"),
        ({"old_mean": torch.zeros(3, 5)}, "`old_mean`"),
        ({"noise": torch.zeros(3, 4)}, "`noise`"),
        ({"log_prob": torch.zeros(3), "old_log_prob": torch.zeros(2)}, "`old_log_prob`"),
    ],
)
def test_bad_input_raises_an_error_naming_the_argument(override, match):
    with pytest.raises(ValueError, match=match):
        presets.grpo_guard(sde="dance")(**{**BASE, **override})


def test_python_floats_for_t_dt_std_match_tensors():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(3, 4, generator=g)
    inputs = {**BASE, "mean": mean, "next_sample": torch.randn(3, 4, generator=g)}
    inputs["advantages"] = torch.tensor([1.0, -0.5, 2.0])
    loss_fn = presets.grpo_guard(sde="dance")
    as_tensors = loss_fn(**inputs)
    as_floats = loss_fn(**{**inputs, "t": 0.5, "dt": -0.1, "std": 0.1})
    torch.testing.assert_close(as_floats.loss, as_tensors.loss)
    torch.testing.assert_close(as_floats.log_ratio, as_tensors.log_ratio)


def test_advantages_as_list_or_numpy_are_converted():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(4)
    inputs = {**BASE, "mean": torch.randn(3, 4, generator=g)}
    values = [1.0, -0.5, 2.0]
    reference = GuardedPPOLoss()(**{**inputs, "advantages": torch.tensor(values)}).loss
    for advantages in (values, np.array(values), np.array(values, dtype=np.float32)):
        out = GuardedPPOLoss()(**{**inputs, "advantages": advantages})
        torch.testing.assert_close(out.loss, reference)


@pytest.mark.parametrize("advantages", [1.0, "abc", None, [["a"]], object()])
def test_non_tensor_advantages_are_rejected_naming_them(advantages):
    with pytest.raises((TypeError, ValueError), match="`advantages`"):
        GuardedPPOLoss()(**{**BASE, "advantages": advantages})


PRESET_NEEDS = {"adaptive_guard": {"times": [1.0, 0.5]}}
"""Arguments a preset cannot do without."""


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_rejects_a_negative_kl_coef(name):
    with pytest.raises(ValueError, match="`kl_coef`"):
        presets.from_name(name, kl_coef=-0.1, **PRESET_NEEDS.get(name, {}))


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_keeps_a_positive_kl_coef(name):
    needs = PRESET_NEEDS.get(name, {})
    loss_fn = presets.from_name(name, kl_coef=0.1, **needs)
    assert loss_fn.kl is not None and loss_fn.kl.coef == 0.1
    assert presets.from_name(name, kl_coef=0.0, **needs).kl is None


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="`old_mean`"):
        presets.grpo_guard()(**{k: v for k, v in BASE.items() if k != "old_mean"})
    with pytest.raises(ValueError, match="`t`"):
        presets.velocity_guard()(**{k: v for k, v in BASE.items() if k != "t"})
    with pytest.raises(ValueError, match="`ref_mean`"):
        presets.flow_grpo(kl_coef=0.1)(**BASE)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.from_name("guard")


def test_advantage_clipping_is_reported():
    out = GuardedPPOLoss(adv_clip=1.0)(**{**BASE, "advantages": torch.tensor([-3.0, 0.5, 2.0])})
    assert out.metrics["adv/clip_frac"] == pytest.approx(2 / 3)
    assert torch.equal(out.advantages, torch.tensor([-1.0, 0.5, 1.0]))


def test_the_clipped_sample_at_log_ratio_90_gets_exactly_zero_gradient():
    """exp(90) overflows float32: the clipped sample's gradient was NaN, its A < 0 twin's
    loss inf. Clipped: gradient exactly 0; the unclipped twin: finite loss and gradient."""
    for advantage, clipped in ((1.0, True), (-1.0, False)):
        mean = torch.tensor([[90.0]], requires_grad=True)
        out = presets.grpo_guard()(
            advantages=torch.tensor([advantage]), mean=mean, old_mean=torch.tensor([[0.0]]),
            next_sample=torch.tensor([[1.0]]), std=torch.tensor([1.0]),
            dt=torch.tensor([-0.25]), t=torch.tensor([0.5]),
        )  # fmt: skip
        out.loss.backward()
        assert mean.grad is not None and bool(out.clipped.item()) is clipped
        assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(mean.grad).all())
        assert (mean.grad.item() == 0.0) is clipped


BATCH_COUPLED = {"grpo_guard_official"}
"""Presets whose log-ratio of one sample depends on the others' means (a batch-mean bias),
so a clipped sample's *mean* still gets gradient through the others' ratios."""
FUZZ_TIMES = torch.linspace(0.9, 0.1, 9)


@settings(max_examples=80, deadline=None)
@given(
    seed=seeds,
    preset=st.sampled_from(sorted(presets.PRESETS)),
    drift=st.lists(st.floats(-3.0, 4.5), min_size=8, max_size=8),
    noise=st.lists(st.floats(0.0, 2.0), min_size=8, max_size=8),
)
def test_every_preset_keeps_losses_finite_and_clipped_gradients_zero_up_to_huge_log_ratios(
    seed, preset, drift, noise
):
    """float32, per-sample drifts of 1e-3 to 3e4 step sizes and draws up to 100 stds from
    the old mean: log-ratios from tiny to beyond +/-1e4. Loss, ratio and gradients are
    finite; where a sample is clipped (or masked) its d loss / d r is exactly 0, and so is
    its mean's gradient (except where the batch shares one bias)."""
    gen = torch.Generator().manual_seed(seed)
    batch, dim = 8, 16
    std = 0.05 + 0.3 * torch.rand(batch, generator=gen)
    old_mean = torch.randn(batch, dim, generator=gen)
    eps = torch.randn(batch, dim, generator=gen)
    sign = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0)
    size = sign * 10 ** torch.tensor(drift)
    direction = eps + 0.3 * torch.randn(batch, dim, generator=gen)
    next_sample = old_mean + std[:, None] * eps * 10 ** torch.tensor(noise)[:, None]
    mean = (old_mean + (std * size)[:, None] * direction).requires_grad_()
    advantages = torch.randn(batch, generator=gen)
    advantages[::3] = 0.0
    kwargs = {"sde": "flow"} if preset not in ("flow_grpo", "dance_grpo") else {}
    kwargs |= {"adaptive_guard": {"times": FUZZ_TIMES}}.get(preset, {})
    loss_fn = presets.from_name(preset, **kwargs)
    out = loss_fn(
        advantages=advantages, mean=mean, old_mean=old_mean, next_sample=next_sample,
        std=std, dt=-0.05, t=FUZZ_TIMES[torch.randint(0, 9, (batch,), generator=gen)],
    )  # fmt: skip
    target(min(float(out.log_ratio.detach().abs().max()), 1e4))
    grad_r, grad_mean = torch.autograd.grad(out.loss, [out.log_ratio, mean])
    for value in (out.loss, out.ratio, out.log_ratio, grad_r, grad_mean):
        assert bool(torch.isfinite(value).all())
    assert bool((grad_r[out.clipped] == 0).all())
    if preset not in BATCH_COUPLED:
        assert bool((grad_mean[out.clipped] == 0).all())


NON_FINITE = [float("nan"), float("inf")]


@pytest.mark.parametrize("value", [*NON_FINITE, 0.0, -1.0])
def test_adv_clip_must_be_finite_and_positive(value):
    """NaN passed the old ``adv_clip <= 0`` check."""
    with pytest.raises(ValueError, match="`adv_clip`"):
        GuardedPPOLoss(adv_clip=value)


@pytest.mark.parametrize("value", [*NON_FINITE, -0.1])
def test_kl_coef_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match="`coef`"):
        KLPenalty(value)


@pytest.mark.filterwarnings("ignore::regclip.LowPrecisionMeanWarning")
@pytest.mark.filterwarnings("ignore::regclip.LowPrecisionOldMeanWarning")
@pytest.mark.parametrize("normalizer", ["identity", "ratio_norm"])
def test_kl_mask_on_bf16_latents_computes_in_float32(normalizer):
    """16-bit latents are upcast before anything is computed: the loss, mask and log-ratio
    equal those of the same (rounded) values given in float32; the gradient equals
    float32's up to its own bf16 rounding. (bf16 *rounding* of the means is what moves the
    result away from the unrounded float32 call; that is what the 16-bit warnings say.)"""
    gen = torch.Generator().manual_seed(0)
    batch, dim, s = 32, 256, 0.05
    old = torch.randn(batch, dim, generator=gen)
    x = old + s * torch.randn(batch, dim, generator=gen)
    mean = old + 5e-3 * s * torch.randn(batch, dim, generator=gen)
    common = dict(advantages=torch.randn(batch, generator=gen), std=s, dt=-0.1)
    loss_fn = presets.kl_mask(bound=1e-6, normalizer=normalizer)
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        m = mean.bfloat16().to(dtype).requires_grad_()
        out = loss_fn(
            **common, mean=m, old_mean=old.bfloat16().to(dtype), next_sample=x.bfloat16().to(dtype)
        )
        (grad,) = torch.autograd.grad(out.loss, m)
        outs.append((out, grad))
    (low, low_grad), (high, high_grad) = outs
    assert low.log_ratio.dtype == torch.float32
    assert 0 < float(high.clipped.float().mean()) < 1
    assert torch.equal(low.clipped, high.clipped)
    torch.testing.assert_close(low.loss, high.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(low.log_ratio, high.log_ratio, rtol=1e-6, atol=0)
    torch.testing.assert_close(low_grad.float(), high_grad, rtol=2**-8, atol=0)
