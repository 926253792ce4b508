"""Timestep reweighters: which one equalizes per-timestep velocity gradients, proved."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from regclip import (
    CustomWeight,
    DanceBetaWeight,
    EqualizingWeight,
    GuardedPPOLoss,
    IdentityRatio,
    InverseDtWeight,
    MeanRevisedRatio,
    NoClip,
    RatioNorm,
    TransitionBatch,
    UniformWeight,
    VelocityRatio,
    make_kernel,
)
from strategies import kernel_names, loss_inputs, make_rollout, seeds, steps, times

NORMALIZERS = [IdentityRatio, MeanRevisedRatio, RatioNorm, VelocityRatio]


def velocity_gradient_at_rollout(kernel, normalizer, reweighter, t, dt, seed):
    """d loss / d v at mu_theta = mu_old (first optimizer step), unclipped surrogate."""
    r = make_rollout(seed, t=t, dt=dt, drift=0.0)
    r.advantages = torch.ones_like(r.advantages)
    loss_fn = GuardedPPOLoss(normalizer, reweighter, NoClip(), kernel=kernel)
    out = loss_fn(**loss_inputs(kernel, r))
    (grad,) = torch.autograd.grad(out.loss, r.velocity)
    return grad


@given(seed=seeds, t1=times, t2=times, h1=steps, h2=steps, name=kernel_names)
@pytest.mark.parametrize("normalizer", NORMALIZERS, ids=lambda n: n.__name__)
def test_equalizing_weight_makes_velocity_gradient_independent_of_t(
    normalizer, seed, t1, t2, h1, h2, name
):
    """With w_t = 1 / |k_t| the gradient one timestep sends to the velocity output is the
    same at any (t, dt), for every kernel and normalizer (k_t: normalizer's velocity gain)."""
    kernel = make_kernel(name)
    g1 = velocity_gradient_at_rollout(
        kernel, normalizer(), EqualizingWeight(), t1, -min(h1, t1 / 2), seed
    )
    g2 = velocity_gradient_at_rollout(
        kernel, normalizer(), EqualizingWeight(), t2, -min(h2, t2 / 2), seed
    )
    torch.testing.assert_close(g1.abs(), g2.abs(), rtol=1e-7, atol=1e-14)


@given(seed=seeds, t1=times, t2=times, h1=steps, h2=steps)
def test_inverse_dt_is_equalizing_for_flow_sde_ratio_norm_below_t_1(seed, t1, t2, h1, h2):
    """The public GRPO-Guard weight 1/|dt| equalizes Flow-SDE (c_t = (1 + eta^2/2) dt)."""
    kernel = make_kernel("flow")
    g1 = velocity_gradient_at_rollout(
        kernel, RatioNorm(), InverseDtWeight(), t1, -min(h1, t1 / 2), seed
    )
    g2 = velocity_gradient_at_rollout(
        kernel, RatioNorm(), InverseDtWeight(), t2, -min(h2, t2 / 2), seed
    )
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-14)


def test_dance_beta_weight_leaves_a_beta_squared_dependence_on_t():
    """The public DanceGRPO reading beta_t / |dt| is not equalizing: the velocity gradient
    ratio between two steps is beta_t1^2 / beta_t2^2, while 1 / (beta_t |dt|) equalizes."""
    eta = 0.3
    kernel = make_kernel("dance", eta)
    beta = lambda t: 1 + eta**2 * (1 - t) / (2 * t)  # noqa: E731
    g_hi = velocity_gradient_at_rollout(kernel, RatioNorm(), DanceBetaWeight(eta), 0.9, -0.05, 7)
    g_lo = velocity_gradient_at_rollout(kernel, RatioNorm(), DanceBetaWeight(eta), 0.1, -0.05, 7)
    torch.testing.assert_close(g_lo / g_hi, torch.full_like(g_lo, beta(0.1) ** 2 / beta(0.9) ** 2))
    e_hi = velocity_gradient_at_rollout(kernel, RatioNorm(), EqualizingWeight(), 0.9, -0.05, 7)
    e_lo = velocity_gradient_at_rollout(kernel, RatioNorm(), EqualizingWeight(), 0.1, -0.05, 7)
    torch.testing.assert_close(e_lo, e_hi)


def test_custom_weight_receives_t_and_dt_and_checks_its_shape():
    b = TransitionBatch.build(
        advantages=torch.zeros(3), std=0.1, dt=-0.2, t=torch.tensor([0.2, 0.5, 0.9])
    )
    w = CustomWeight(lambda t, dt: t / dt.abs())(b, RatioNorm())
    torch.testing.assert_close(w, torch.tensor([1.0, 2.5, 4.5]))
    with pytest.raises(ValueError, match="shape"):
        CustomWeight(lambda t, dt: torch.ones(2))(b, RatioNorm())


def test_reweighter_that_needs_t_without_t_names_it():
    b = TransitionBatch.build(advantages=torch.zeros(2), std=0.1, dt=-0.2)
    with pytest.raises(ValueError, match="`t`"):
        DanceBetaWeight(0.3)(b, RatioNorm())
    with pytest.raises(ValueError, match="`t`"):
        EqualizingWeight()(
            TransitionBatch.build(
                advantages=torch.zeros(2), std=0.1, dt=-0.2, kernel=make_kernel("dance")
            ),
            RatioNorm(),
        )
    with pytest.raises(ValueError, match="kernel"):
        EqualizingWeight()(
            TransitionBatch.build(advantages=torch.zeros(2), std=0.1, dt=-0.2, t=torch.ones(2) / 2),
            RatioNorm(),
        )


# Independent references, written from the published equations (docs/theory.md sections 1
# and 4), not from regclip's code: the transition std s_t and velocity slope c_t of each
# kernel, then each reweighter's weight.
ETA = {"flow": 0.7, "dance": 0.3, "cps": 0.7}


def reference_std_and_slope(name: str, t: float, dt: float) -> tuple[float, float]:
    eta = ETA[name]
    if name == "flow":
        sigma = eta * math.sqrt(t / (1 - t))
        return sigma * math.sqrt(-dt), (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    if name == "dance":
        return eta * math.sqrt(-dt), (1 + eta**2 * (1 - t) / (2 * t)) * dt
    t_next = t + dt
    s = t_next * math.sin(eta * math.pi / 2)
    return s, -t * (1 - t_next) + (1 - t) * math.sqrt(t_next**2 - s**2)


def reference_weight(reweighter: str, normalizer: str, kernel: str, t: float, dt: float) -> float:
    s, c = reference_std_and_slope(kernel, t, dt)
    if reweighter == "uniform":
        return 1.0
    if reweighter == "inverse_dt":
        return 1 / abs(dt)
    if reweighter == "dance_beta":
        return (1 + ETA[kernel] ** 2 * (1 - t) / (2 * t)) / abs(dt)
    # equalizing: 1 / |k_t| with k_t = scale_t c_t / s
    scale = {"identity": 1.0, "mean_revised": 1.0, "ratio_norm": s, "velocity": s / abs(c)}
    return 1 / abs(scale[normalizer] * c / s)


REWEIGHTERS = {
    "uniform": lambda kernel: UniformWeight(),
    "inverse_dt": lambda kernel: InverseDtWeight(),
    "dance_beta": lambda kernel: DanceBetaWeight(ETA[kernel]),
    "equalizing": lambda kernel: EqualizingWeight(),
}
POINTS = [(0.9, -0.05), (0.6, -0.1), (0.3, -0.2), (0.12, -0.04)]


@pytest.mark.parametrize("kernel_name", ["flow", "dance", "cps"])
@pytest.mark.parametrize("normalizer", NORMALIZERS, ids=lambda n: n.__name__)
@pytest.mark.parametrize("reweighter", sorted(REWEIGHTERS))
def test_every_reweighter_is_positive_and_equals_the_published_weight(
    reweighter, normalizer, kernel_name
):
    kernel = make_kernel(kernel_name, ETA[kernel_name])
    norm = normalizer()
    t = torch.tensor([p[0] for p in POINTS], dtype=torch.float64)
    dt = torch.tensor([p[1] for p in POINTS], dtype=torch.float64)
    std = kernel.std(t, dt)
    batch = TransitionBatch.build(
        advantages=torch.zeros(len(POINTS), dtype=torch.float64), std=std, dt=dt, t=t,
        kernel=kernel,
    )  # fmt: skip
    weight = REWEIGHTERS[reweighter](kernel_name)(batch, norm)
    expected = torch.tensor(
        [reference_weight(reweighter, norm.name, kernel_name, *p) for p in POINTS],
        dtype=torch.float64,
    )
    assert bool((weight > 0).all()), weight
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kernel_name", ["dance", "cps", "flow"])
def test_guard_loss_and_gradient_point_towards_the_reward(kernel_name):
    """The guard's loss at the rollout point is exactly ``-mean(w A)`` with the published
    positive weight, and one gradient step raises the ratio of every positive-advantage
    sample and lowers it for every negative one (a weight that lost its ``abs`` flips
    both: training would run against the reward)."""
    kernel = make_kernel(kernel_name, ETA[kernel_name])
    loss_fn = GuardedPPOLoss(RatioNorm(), EqualizingWeight(), NoClip(), kernel=kernel)
    r = make_rollout(3, batch=len(POINTS), drift=0.0)
    r.t = torch.tensor([p[0] for p in POINTS], dtype=torch.float64)
    r.dt = torch.tensor([p[1] for p in POINTS], dtype=torch.float64)
    r.advantages = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    inputs = loss_inputs(kernel, r)
    out = loss_fn(**inputs)
    w = torch.tensor(
        [reference_weight("equalizing", "ratio_norm", kernel_name, *p) for p in POINTS],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out.loss, -(w * r.advantages).mean(), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(out.loss, r.velocity)
    with torch.no_grad():
        r.velocity -= 1e-3 * grad / grad.abs().max()
    moved = loss_fn(**loss_inputs(kernel, r)).log_ratio
    assert bool((moved * r.advantages > 0).all()), (moved, r.advantages)


@pytest.mark.parametrize("eta", [float("nan"), float("inf"), 0.0])
def test_dance_beta_weight_eta_must_be_finite_and_positive(eta):
    with pytest.raises(ValueError, match="`eta`"):
        DanceBetaWeight(eta)
