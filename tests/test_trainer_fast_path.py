"""The trainer's fast path changes nothing it computes.

* Stacking several trained timesteps into one transformer call
  (``timesteps_per_call``) gives the per-timestep loop's gradient and parameter update
  (float64 model, tolerance of float32 velocities); presets whose loss couples a batch's
  rows are refused.
* Compiling the transformer's repeated blocks (``compile_transformer``) gives the eager
  gradient, and every block runs compiled.
* The update reads no device value on the host until its end: every host read
  (``item``, ``tolist``, ``cpu``, ``numpy``, ``float``/``int``/``bool``/index of a tensor) made
  from regclip, diffusers, peft or accelerate code inside :meth:`GRPOTrainer.accumulate`
  raises. On CUDA each such read is a synchronisation; on the CPU this is its proxy.
  Reads from ``torch.optim`` are allowed: its step counter lives on the host (a CPU
  tensor) unless the fused CUDA optimizer keeps it on the device.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from regclip.trainer import GRPOTrainer, TrainConfig, build_components
from regclip.trainer.trainer import compile_blocks, timestep_chunks

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
GUARDED = ("/regclip/", "/diffusers/", "/peft/", "/accelerate/")


def _trainer(tmp_path: Path, arch: str, **overrides: object) -> GRPOTrainer:
    base: dict[str, object] = {"vae": "none", "reward": "latent_std", "output_dir": str(tmp_path)}
    config = TrainConfig.smoke(arch, **{**base, **overrides})
    return GRPOTrainer(config, build_components(config))


def _float64(trainer: GRPOTrainer) -> GRPOTrainer:
    """The same trainer computing in float64 (its velocities stay float32)."""
    trainer.unwrapped.double()
    trainer.input_dtype = torch.float64
    trainer.embeds = trainer.embeds.to("cpu", torch.float64)
    return trainer


def _update_with_grads(trainer: GRPOTrainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One iteration's update; returns the gradients the optimizer stepped with (after
    clipping) and the parameter change."""
    rollouts, _ = trainer.rollout()
    before = [p.detach().clone() for p in trainer.trainable]
    grads: list[torch.Tensor] = []
    step = trainer.optimizer.step

    def record() -> None:
        if trainer.accelerator.sync_gradients:
            grads.extend(p.grad.detach().clone() for p in trainer.trainable)  # type: ignore[union-attr]
        step()

    trainer.optimizer.step = record  # type: ignore[method-assign]
    trainer.update(rollouts)
    return grads, [p.detach() - b for p, b in zip(trainer.trainable, before, strict=True)]


def test_timestep_chunks_cover_every_step_once_in_order() -> None:
    for k in range(1, 12):
        for per_call in range(1, k + 2):
            chunks = timestep_chunks(k, per_call)
            assert [s for c in chunks for s in c] == list(range(k))
            assert all(len(c) == per_call for c in chunks[:-1]) and 0 < len(chunks[-1]) <= per_call
    with pytest.raises(ValueError, match="timesteps_per_call"):
        timestep_chunks(3, 0)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("per_call", [2, 3])
def test_stacked_timesteps_give_the_per_timestep_loops_gradient_and_update(
    tmp_path: Path, arch: str, per_call: int
) -> None:
    """K = 3 trained steps, two rollout batches accumulated into one optimizer step;
    ``per_call = 2`` makes uneven chunks (2 + 1): without the per-chunk weight the lone
    step would count twice. The gradient clip is off so that a wrong weight cannot hide
    behind it."""
    common = {"accumulate_batches": 2, "max_grad_norm": 1e9, "seed": 5}
    # one trainer at a time: accelerate keeps the accumulation count in a process-wide state
    loop = _float64(_trainer(tmp_path / "loop", arch, **common))
    grads_loop, delta_loop = _update_with_grads(loop)
    stacked = _float64(_trainer(tmp_path / "stacked", arch, timesteps_per_call=per_call, **common))
    assert stacked.accelerator.gradient_accumulation_steps == 2 * len(stacked.chunks)
    grads_stacked, delta_stacked = _update_with_grads(stacked)
    assert len(grads_loop) == len(grads_stacked) == len(loop.trainable)
    norm = torch.cat([g.flatten() for g in grads_loop]).norm()
    assert norm > 0
    for a, b in zip(grads_stacked, grads_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(norm))
    for a, b in zip(delta_stacked, delta_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_presets_that_couple_rows_refuse_stacked_timesteps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"timesteps_per_call.*BatchRatioNorm"):
        _trainer(tmp_path, "sd3", preset="grpo_guard_official", timesteps_per_call=2)
    _trainer(tmp_path, "sd3", preset="grpo_guard_official")  # one step per call is fine


@pytest.mark.parametrize(
    ("arch", "sde", "preset", "per_call"),
    [("sd3", "flow", "grpo_guard", 1), ("flux", "flow", "flow_grpo", 2),
     ("flux", "dance", "grpo_guard", 3)],
)  # fmt: skip
def test_update_reads_no_device_value_before_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, sde: str, preset: str,
    per_call: int,
) -> None:  # fmt: skip
    trainer = _trainer(
        tmp_path, arch, sde=sde, preset=preset, timesteps_per_call=per_call, passes=2
    )
    rollouts, _ = trainer.rollout()
    reads: list[str] = []

    def guard(name: str, original: object) -> object:
        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            caller = sys._getframe(1).f_code.co_filename
            if any(part in caller for part in GUARDED):
                reads.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
                raise AssertionError(f"host read of a tensor ({name}) inside the update")
            return original(self, *args, **kwargs)  # type: ignore[operator]

        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        sums, norms, outputs, steps = trainer.accumulate(rollouts)
    assert not reads
    assert steps == 2 * len(rollouts) and len(norms) == steps
    assert len(outputs) == 2 * len(rollouts) * len(trainer.chunks)
    assert {"loss", "clip/frac"} <= set(sums)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in sums.values())


INDUCTOR_ON_CUDA = pytest.param("cuda", "inductor", marks=pytest.mark.gpu, id="inductor-cuda")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize(("device", "backend"), [("cpu", "aot_eager"), INDUCTOR_ON_CUDA])
def test_compiled_blocks_give_the_eager_gradient(
    tmp_path: Path, arch: str, device: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamo traces every repeated block with its LoRA layers (AOT autograd builds the
    backward; on the CPU ``aot_eager`` runs the traced graphs without code generation, so
    it needs no compiler; on CUDA inductor generates the kernels ``compile_transformer``
    runs) and the update's gradients equal the eager trainer's. SD3 gets all three block
    variants (dual attention, plain, context-pre-only last) and both models a KL term (a
    pass with the adapter off): more graphs than dynamo's default limit of 8, and the
    trainer's scope raises rather than run a block eagerly past its own limit. Inductor
    fuses and reorders float32 reductions, hence its looser tolerance."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from regclip.trainer.arch import SD3Architecture

    six_layers = {"num_layers": 6, "dual_attention_layers": (0, 1, 2)}
    monkeypatch.setattr(
        SD3Architecture, "tiny_config", {**SD3Architecture.tiny_config, **six_layers}
    )
    torch._dynamo.reset()
    eager = _trainer(tmp_path / "eager", arch, kl_coef=0.1, device=device)
    compiled = _trainer(tmp_path / "compiled", arch, kl_coef=0.1, device=device)
    compiled.config = replace(compiled.config, compile_transformer=True)  # its scope, our backend
    counter = CompileCounterWithBackend(backend)
    names = compiled.arch.repeated_blocks
    blocks = [m for m in compiled.unwrapped.modules() if type(m).__name__ in names]
    assert compile_blocks(compiled.unwrapped, names, backend=counter) == len(blocks) >= 2
    eager_grads, eager_step = _update_with_grads(eager)
    compiled_grads, compiled_step = _update_with_grads(compiled)
    torch._dynamo.reset()
    assert counter.frame_count > (8 if arch == "sd3" else len(names))
    assert len(compiled_grads) == len(eager_grads) > 0
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-7} if backend == "aot_eager" else {"rtol": 1e-3, "atol": 1e-5}
    )
    for got, want in zip(compiled_grads + compiled_step, eager_grads + eager_step, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def test_compile_blocks_names_the_missing_block_class() -> None:
    with pytest.raises(ValueError, match="no JointTransformerBlock block in Linear"):
        compile_blocks(torch.nn.Linear(2, 2), ("JointTransformerBlock",))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("arch", "per_call", "compiled"), [("sd3", 1, False), ("flux", 3, False), ("sd3", 1, True)]
)
def test_update_on_cuda_never_synchronises(
    tmp_path: Path, arch: str, per_call: int, compiled: bool
) -> None:
    """The real check behind the CPU proxy above: CUDA's sync debug mode raises on any
    synchronising call (``item``, blocking copies either way, ``nonzero``...)."""
    trainer = _trainer(
        tmp_path, arch, device="cuda", timesteps_per_call=per_call, compile_transformer=compiled
    )
    rollouts, _ = trainer.rollout()
    trainer.accumulate(rollouts)  # warm-up: kernels compile, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums, _, _, steps = trainer.accumulate(rollouts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == len(rollouts) and "loss" in sums


def test_stacked_timesteps_with_a_compiled_transformer_warn(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="timesteps_per_call > 1 with compile_transformer"):
        _trainer(tmp_path, "sd3", timesteps_per_call=3, compile_transformer=True)
