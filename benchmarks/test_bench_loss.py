"""pytest-benchmark suite: forward + backward of the policy loss at SD3.5-M, Flux and Wan
latent shapes, for vanilla Flow-GRPO, the public GRPO-Guard formulation, regclip eager and
regclip fused (see ``guard_formulations``).

On CPU (CI) it runs small shapes once each as a smoke test (``--benchmark-disable`` is in
the project's addopts; no timing assertions). With CUDA it uses the issue's full shapes:
``pytest benchmarks -p no:cacheprovider --benchmark-enable`` for timings (the ratios the
project reports come from ``benchmarks/perf_gpu.py``, which times all methods side by side).
"""

from __future__ import annotations

import pytest
import torch

from guard_formulations import CPU_SHAPES, FORMULATIONS, GPU_SHAPES, make_transitions

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES


@pytest.mark.parametrize("method", list(FORMULATIONS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_loss_forward_backward(benchmark, shape_name: str, method: str) -> None:
    batch, shape = SHAPES[shape_name]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    transitions = make_transitions(batch, shape, DEVICE, generator)
    step = FORMULATIONS[method]

    def call() -> torch.Tensor:
        grad = step(transitions)
        if CUDA:
            torch.cuda.synchronize()
        return grad

    benchmark.group = shape_name
    grad = benchmark(call)
    assert grad.shape == transitions.mean.shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
