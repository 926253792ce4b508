"""The fused guard loss (regclip.fused) computes the eager loss: values, gradients, metrics.

The Triton kernels run on CUDA (tests marked ``gpu``) and, on CPU, under Triton's
interpreter (``TRITON_INTERPRET=1`` with Triton installed); elsewhere the eager fallback is
checked. The eager :class:`regclip.GuardedPPOLoss` path is the reference.
"""

from __future__ import annotations

import pytest
import torch

import regclip
from regclip import TransitionBatch, fused, presets

PRESETS = (
    "flow_grpo",
    "mean_revised",
    "ratio_norm",
    "grpo_guard",
    "grpo_guard_dance",
    "velocity_guard",
)

DEVICES = [
    pytest.param("cuda", marks=pytest.mark.gpu),
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not fused.is_available("cpu"), reason="Triton interpreter off (TRITON_INTERPRET=1)"
        ),
    ),
]


def make_inputs(
    batch: int,
    shape: tuple[int, ...],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    drift: float = 0.5,
    seed: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Loss keywords for transitions with ``mean - old_mean ~ drift * s`` (varied per sample)
    and the rollout noise. Seed 0 unless ``seed`` is given."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device)

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=device)

    per = (batch,) + (1,) * len(shape)
    std = 0.03 + 0.3 * rand(batch)
    old_mean = randn(batch, *shape)
    noise = randn(batch, *shape)
    next_sample = old_mean + std.view(per) * noise
    step = (
        drift
        * std.view(per)
        * rand(batch).view(per)
        / max(1.0, float(torch.tensor(shape).prod()) ** 0.25)
    )
    mean = (old_mean + step * randn(batch, *shape)).to(dtype).requires_grad_()
    inputs = dict(
        advantages=3 * randn(batch),
        mean=mean,
        old_mean=old_mean,
        next_sample=next_sample,
        std=std,
        dt=-(0.02 + 0.2 * rand(batch)),
        t=0.1 + 0.8 * rand(batch),
    )
    return inputs, noise


def build(name: str, fused_path: bool, *, dual: bool = False) -> regclip.GuardedPPOLoss:
    clip = {"flow_grpo": 1e-3, "mean_revised": 1e-3}.get(name, 2e-4)
    if name == "grpo_guard_dance":  # equalizing weights: a reweighter computed eagerly
        loss_fn = presets.grpo_guard(sde="dance", clip_range=clip)
    else:
        loss_fn = presets.from_name(name, clip_range=clip)
    if dual:
        loss_fn.surrogate = regclip.DualClip(clip, dual=1.0 + 2 * clip)
    loss_fn.fused = fused_path
    return loss_fn


def run(
    loss_fn: regclip.GuardedPPOLoss,
    inputs: dict[str, torch.Tensor],
    noise: torch.Tensor | None,
    extra: bool = False,
):
    kw = dict(inputs)
    if noise is not None:
        kw["noise"] = noise
        del kw["old_mean"]
    out = loss_fn(**kw)
    objective = out.loss
    if extra:  # gradients through the log-ratio and ratio outputs as well
        objective = objective + 0.3 * out.log_ratio.sum() - 0.2 * out.ratio.sum()
    (grad,) = torch.autograd.grad(objective, inputs["mean"])
    return out, grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_same_loss(out, grad, ref, ref_grad, *, grad_tol: float) -> None:
    assert torch.isfinite(grad).all()
    assert out.log_ratio.dtype == ref.log_ratio.dtype == torch.float32
    scale = ref.log_ratio.abs().max().item()
    torch.testing.assert_close(out.log_ratio, ref.log_ratio, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(out.ratio, ref.ratio, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.advantages, ref.advantages)
    torch.testing.assert_close(out.weight, ref.weight)
    low, high = ref.clip_bounds
    near = torch.zeros_like(ref.clipped)
    for bound in (None if low is None else 1 - low, None if high is None else 1 + high):
        if bound is not None:
            near |= (ref.ratio - bound).abs() < 1e-6
    assert torch.equal(out.clipped[~near], ref.clipped[~near])
    assert rel_err(grad, ref_grad) < grad_tol
    assert set(out.metrics) == set(ref.metrics) - {"loss/kl"}
    for key, value in out.metrics.items():
        assert value == pytest.approx(ref.metrics[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("use_noise", [False, True])
@pytest.mark.parametrize("dual", [False, True])
def test_fused_matches_eager_float32(device: str, name: str, use_noise: bool, dual: bool) -> None:
    inputs, noise = make_inputs(5, (3, 9, 7), device=device)
    eager = run(build(name, False, dual=dual), inputs, noise if use_noise else None)
    out = run(build(name, True, dual=dual), inputs, noise if use_noise else None)
    assert out[0].loss.grad_fn is not None and "FusedGuard" in type(out[0].loss.grad_fn).__name__
    assert_same_loss(*out, *eager, grad_tol=1e-5)


@pytest.mark.filterwarnings("ignore::regclip.LowPrecisionMeanWarning")  # what this test feeds
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_eager_16bit_means(device: str, dtype: torch.dtype) -> None:
    inputs, noise = make_inputs(4, (4, 16, 16), device=device, dtype=dtype)
    eager = run(build("grpo_guard", False), inputs, noise)
    out = run(build("grpo_guard", True), inputs, noise)
    assert out[1].dtype == dtype
    assert_same_loss(*out, *eager, grad_tol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gradient_flows_through_log_ratio_and_ratio_outputs(device: str) -> None:
    inputs, _ = make_inputs(3, (2, 5, 5), device=device)
    eager = run(build("grpo_guard", False), inputs, None, extra=True)
    out = run(build("grpo_guard", True), inputs, None, extra=True)
    assert_same_loss(*out, *eager, grad_tol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "shape"), [(1, (7,)), (2, (3, 1000)), (33, (16, 8, 8))])
def test_fused_handles_odd_sizes(device: str, batch: int, shape: tuple[int, ...]) -> None:
    inputs, noise = make_inputs(batch, shape, device=device)
    eager = run(build("grpo_guard", False), inputs, noise)
    out = run(build("grpo_guard", True), inputs, noise)
    assert_same_loss(*out, *eager, grad_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "shape"), [(8, (16, 64, 64)), (2, (16, 21, 60, 104))])
def test_fused_at_model_shapes_against_float64(batch: int, shape: tuple[int, ...]) -> None:
    """SD3.5-M 512 px and a Wan latent: fused float32 against the eager loss in float64,
    and bitwise repeatable (the reduction order is fixed: a race would move the result)."""
    inputs, noise = make_inputs(batch, shape, device="cuda")
    inputs64 = {k: v.detach().double() for k, v in inputs.items()}
    inputs64["mean"].requires_grad_()
    ref, ref_grad = run(build("grpo_guard", False), inputs64, noise.double())
    loss_fn = build("grpo_guard", True)
    out, grad = run(loss_fn, inputs, noise)
    assert rel_err(out.log_ratio, ref.log_ratio) < 1e-4
    assert rel_err(grad, ref_grad) < 1e-5
    for _ in range(5):
        again, again_grad = run(loss_fn, inputs, noise)
        assert torch.equal(again.log_ratio, out.log_ratio)
        assert torch.equal(again_grad, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["flow_grpo", "grpo_guard", "grpo_guard_dance"])
@pytest.mark.parametrize("dual", [False, True])
def test_fused_keeps_clipped_gradients_exactly_zero_at_huge_log_ratios(
    device: str, name: str, dual: bool
) -> None:
    """Log-ratios up to ~1e4 (exp overflows float32 past ~88.7): as the eager path, the
    fused kernels use the bounded ratio (regclip.surrogate.bounded_exp), so clipped rows get
    gradient exactly 0 and loss, ratio and gradients (also through the ratio output) stay
    finite and match eager."""
    inputs, noise = make_inputs(12, (4, 8), device=device, seed=3)
    size = torch.tensor([1e-3, 2.0, 30.0, 300.0, 3e3, 1e4] * 2, device=device)
    sign = torch.tensor([1.0, -1.0] * 6, device=device).view(-1, 1, 1)
    direction = noise * (size.view(-1, 1, 1) * sign * inputs["std"].view(-1, 1, 1))
    inputs["mean"] = (inputs["old_mean"] + direction).requires_grad_()
    inputs["advantages"][::4] = 0.0
    fused_loss = build(name, True, dual=dual)
    ref, ref_grad = run(build(name, False, dual=dual), inputs, noise, extra=True)
    out, grad = run(fused_loss, inputs, noise, extra=True)
    assert out.backend == "fused" and ref.backend == "eager"
    assert float(ref.log_ratio.detach().abs().max()) > 1e3
    for value in (out.loss, out.ratio, grad, ref.loss, ref.ratio, ref_grad):
        assert bool(torch.isfinite(value).all())
    assert torch.equal(out.clipped, ref.clipped) and bool(out.clipped.any())
    _, loss_grad = run(fused_loss, inputs, noise)
    assert bool((loss_grad[out.clipped] == 0).all())
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.ratio, ref.ratio, rtol=1e-4, atol=1e-6)
    assert rel_err(grad, ref_grad) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_fused_two_launch_variant_matches_single_launch(device: str) -> None:
    from regclip.fused.function import SurrogateConfig, fused_guard

    inputs, _ = make_inputs(6, (16, 24, 24), device=device)
    args = [
        inputs[k].detach() for k in ("mean", "old_mean", "next_sample", "std", "dt", "advantages")
    ]
    results = [
        fused_guard(
            *args, SurrogateConfig(True, 1, 1, 5.0, 1 - 2e-4, 1 + 2e-4, None, one), noise=False
        )
        for one in (True, False, True)
    ]
    for a, b, c in zip(*results, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.gpu
def test_fused_under_torch_compile_and_cuda_graph() -> None:
    inputs, noise = make_inputs(8, (16, 64, 64), device="cuda", seed=0)
    loss_fn = build("grpo_guard", True)
    loss_fn.validate = False
    kw = {k: v for k, v in inputs.items() if k != "old_mean"}
    eager, eager_grad = run(loss_fn, inputs, noise)

    compiled = torch.compile(lambda **k: loss_fn(**k).loss)
    (grad,) = torch.autograd.grad(compiled(**kw, noise=noise), inputs["mean"])
    torch.testing.assert_close(grad, eager_grad)

    mean = inputs["mean"].detach().clone().requires_grad_()
    static = dict(kw, mean=mean, noise=noise)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            loss_fn(**static).loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    mean.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loss_fn(**static)
        out.loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(mean.grad, eager_grad)
    torch.testing.assert_close(out.loss, eager.loss)


def test_fused_flag_runs_the_eager_path_where_a_call_cannot_run_fused() -> None:
    """On CPU without the interpreter (or with log-probs only), ``fused=True`` gives the
    eager result exactly and says so in ``backend``."""
    inputs, _ = make_inputs(4, (2, 6, 6))
    means_free = {k: v for k, v in inputs.items() if k not in ("mean", "old_mean", "next_sample")}
    rng = torch.Generator().manual_seed(3)
    log_probs = {"log_prob": torch.randn(4, generator=rng, dtype=torch.float64),
                 "old_log_prob": torch.randn(4, generator=rng, dtype=torch.float64)}  # fmt: skip
    cases = [("flow_grpo", dict(means_free, **log_probs))]
    if not fused.is_available("cpu"):
        cases.append(("grpo_guard", inputs))
    for name, kw in cases:
        loss_fn = build(name, True)
        out = loss_fn(**kw)
        assert out.backend == "eager"
        eager = build(name, False)(**kw)
        assert torch.equal(out.loss, eager.loss)
        assert out.metrics == eager.metrics
        batch = TransitionBatch.build(**kw, kernel=loss_fn.kernel)
        assert fused.call_blocker(loss_fn, batch) is not None
        assert not fused.supports(loss_fn, batch)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: presets.grpo_guard(kl_coef=0.1), "no KL term"),
        (
            lambda: regclip.GuardedPPOLoss(regclip.IdentityRatio(source="log_prob")),
            "from the means",
        ),
        (lambda: presets.kl_mask(bound=1e-3), "PPO-clip surrogate only"),
    ],
)
def test_a_loss_the_fused_backend_can_never_run_is_refused_naming_why(make, reason) -> None:
    loss_fn = make()
    with pytest.raises(ValueError, match=f"fused=True: .*{reason}"):
        loss_fn.fused = True
    assert loss_fn.fused is False
