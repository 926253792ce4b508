"""Drive DanceGRPO's real ``train_one_step`` (rollout, advantages, training) without its
downloads.

``train_one_step`` needs a FLUX transformer, a VAE, a reward model and a prompt loader.
This module builds random-weight ones (tiny for the tests, FLUX.1-dev's transformer config
for the GPU run), a stand-in for the PickScore reward (it scores an image by its mean
brightness through upstream's own ``calc_probs`` call), and runs upstream's function
unchanged in a one-process ``torch.distributed`` group. ``transformer.clip_grad_norm_`` is
FSDP's API: :class:`FSDPStandIn` provides it for an unsharded model, or ``--fsdp`` wraps
the model in real FSDP (CUDA).

``torchrun --nproc_per_node 1 -m integrations.dance_grpo.smoke --arch tiny --steps 2``
(plain ``python -m`` works too: a missing rendezvous is filled in).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from regclip import DanceSDE
from regclip.trainer.arch import FluxArchitecture

from ..common import RegclipOptions
from .adapter import DanceGRPOAdapter, UpstreamDanceGRPO, load_upstream

__all__ = ["FLUX_DEV_TRANSFORMER", "FSDPStandIn", "build_models", "make_args", "train_step"]

FLUX_DEV_TRANSFORMER: dict[str, Any] = FluxArchitecture.full_config
"""``black-forest-labs/FLUX.1-dev`` ``transformer/config.json`` (11.9 B params)."""

TINY_TRANSFORMER: dict[str, Any] = {**FluxArchitecture.tiny_config, "pooled_projection_dim": 32}
"""The trainer's tiny FLUX transformer with a 32-wide pooled projection."""
STANDINS = ["wandb", "cv2", "liger_kernel", "flash_attn", "decord", "torchvision"]


class FSDPStandIn(nn.Module):
    """An unsharded module with FSDP's ``clip_grad_norm_``. Floating inputs are cast to the
    module's dtype: upstream feeds bf16 latents and relies on CUDA autocast, which a CPU
    run does not have."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs: Any) -> Any:
        dtype = next(self.module.parameters()).dtype
        cast = {
            k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()
        }
        return self.module(**cast)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)


class _Inputs(dict):
    def to(self, device: Any) -> _Inputs:
        return _Inputs({k: v.to(device) for k, v in self.items()})


class BrightnessProcessor:
    """Stand-in for PickScore's processor: images -> pixel tensors, text -> a constant."""

    def __call__(self, images: Any = None, text: Any = None, **_: Any) -> _Inputs:
        if images is not None:
            pixels = np.stack(
                [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]
            )
            return _Inputs(pixel_values=torch.from_numpy(pixels))
        return _Inputs(input_ids=torch.ones(len(text) if isinstance(text, list) else 1, 1))


class BrightnessScorer(nn.Module):
    """Stand-in for PickScore: ``cos(text, image)`` grows with the image's brightness."""

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        brightness = pixel_values.mean(dim=(1, 2, 3))
        return torch.stack([brightness, torch.full_like(brightness, 0.5)], dim=1)

    def get_text_features(self, input_ids: Tensor) -> Tensor:
        return torch.cat([input_ids, torch.zeros_like(input_ids)], dim=1)


def make_args(**overrides: Any) -> SimpleNamespace:
    """The fields of upstream's argparse that ``train_one_step`` reads (defaults from
    ``scripts/finetune/finetune_flux_grpo.sh``, smaller)."""
    values = {
        "h": 32,
        "w": 32,
        "t": 1,
        "sampling_steps": 4,
        "eta": 0.3,
        "shift": 3.0,
        "num_generations": 4,
        "use_group": True,
        "timestep_fraction": 0.6,
        "init_same_noise": True,
        "clip_range": 1e-4,
        "adv_clip_max": 5.0,
        "gradient_accumulation_steps": 2,
        "use_hpsv2": False,
        "use_pickscore": True,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def build_models(
    arch: str = "tiny", seed: int = 0, device: str = "cpu"
) -> tuple[nn.Module, nn.Module]:
    """Random-weight ``FluxTransformer2DModel`` and a 16-channel, 8x ``AutoencoderKL``, built
    on ``device`` (bf16 on CUDA, as upstream loads them)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = FLUX_DEV_TRANSFORMER if arch == "flux-dev" else TINY_TRANSFORMER
    width = (128, 256, 512, 512) if arch == "flux-dev" else (4, 4, 4, 4)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config)
        vae = _vae(arch, width)
    if device != "cpu":
        transformer.to(torch.bfloat16)
        vae.to(torch.bfloat16)
    return transformer, vae


def _vae(arch: str, width: tuple[int, ...]) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=width,
        layers_per_block=1 if arch == "tiny" else 2,
        norm_num_groups=2 if arch == "tiny" else 32,
    )


class MeanCheck:
    """Wraps the (adapted) ``flux_step`` to measure, on every sampling step, how far the
    Dance-SDE kernel's mean is from upstream's own ``prev_sample_mean`` (``grpo=False``),
    in units of the step's std. On CUDA upstream forms its mean from a bf16 velocity in
    bf16 arithmetic; the kernel computes in fp32."""

    def __init__(self, adapter: DanceGRPOAdapter) -> None:
        self.adapter = adapter
        self.adapted = adapter.upstream.train_module.flux_step
        self.max_gap_in_std = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.adapter._flux_signature.bind(*args, **kwargs).arguments
        if call.get("prev_sample") is None:
            upstream = self.adapter._originals["flux_step"]
            own, _ = upstream(**{**call, "grpo": False})
            sigmas, index = call["sigmas"], int(call["index"])
            t, dt = float(sigmas[index]), float(sigmas[index + 1] - sigmas[index])
            kernel = DanceSDE(float(call["eta"]))
            mean, std = kernel.evaluate(call["latents"], call["model_output"], t, dt)
            gap = float(((mean - own.float()).abs().max() / std.max()).item())
            self.max_gap_in_std = max(self.max_gap_in_std, gap)
        return self.adapted(*args, **kwargs)


def prompt_loader(transformer: nn.Module, seq: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """Batches of one prompt as ``latent_collate_function`` yields them."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield (
            torch.randn(1, seq, config.joint_attention_dim, generator=generator),
            torch.randn(1, config.pooled_projection_dim, generator=generator),
            torch.zeros(1, 3),
            ["a random prompt"],
        )


def init_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
    }.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def train_step(
    up: UpstreamDanceGRPO,
    args: SimpleNamespace,
    transformer: nn.Module,
    vae: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterator[tuple[Any, ...]],
    device: torch.device,
    max_grad_norm: float = 2.0,
) -> tuple[float, float]:
    """Upstream's ``train_one_step`` with the stand-in reward, in a scratch directory."""
    init_process_group()
    scheduler = SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.0])
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        Path("images").mkdir()
        try:
            device_loader = (
                tuple(x.to(device) if isinstance(x, Tensor) else x for x in b) for b in loader
            )
            return up.train_module.train_one_step(
                args,
                device,
                transformer,
                vae,
                BrightnessScorer(),
                BrightnessProcessor(),
                optimizer,
                scheduler,
                device_loader,
                None,
                max_grad_norm,
                None,
                None,
            )
        finally:
            os.chdir(cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", default=None)
    parser.add_argument("--arch", choices=["tiny", "flux-dev"], default="tiny")
    parser.add_argument("--preset", default="grpo_guard")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sampling_steps", type=int, default=4)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="wrap in real FSDP (CUDA)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--sdpa",
        choices=["default", "no_cudnn", "math"],
        default="no_cudnn",
        help="attention backends on CUDA (a first FLUX.1-dev-size backward on an H100 hit an "
        "illegal memory access with the default choice)",
    )
    parser.add_argument(
        "--check_means", action="store_true", help="measure kernel vs upstream mean"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from ..standins import install_standins

    install_standins(STANDINS)
    up = load_upstream(args.src)
    init_process_group()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and args.sdpa != "default":
        torch.backends.cuda.enable_cudnn_sdp(False)
        if args.sdpa == "math":
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
    transformer, vae = build_models(args.arch, device=device.type)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped: nn.Module = FSDP(transformer, device_id=device, use_orig_params=True)
    else:
        wrapped = FSDPStandIn(transformer)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1e-5)
    run_args = make_args(
        h=args.resolution,
        w=args.resolution,
        sampling_steps=args.sampling_steps,
        num_generations=args.num_generations,
    )
    loader = prompt_loader(transformer, args.seq, seed=0)
    logs: list[dict[str, float]] = []
    up.train_module.wandb = SimpleNamespace(log=lambda d, step=None: logs.append(dict(d)))
    results = []
    with DanceGRPOAdapter(up, RegclipOptions(preset=args.preset)) as adapter:
        check = MeanCheck(adapter) if args.check_means else None
        if check is not None:
            up.train_module.flux_step = check
        for step in range(args.steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss, grad_norm = train_step(up, run_args, wrapped, vae, optimizer, loader, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            up.train_module.wandb.log(
                {"train_loss": loss, "grad_norm": grad_norm, "step_time": seconds}
            )
            stats = {
                "step": step,
                "seconds": seconds,
                "upstream_train_loss": loss,
                "grad_norm": grad_norm,
                "stored_transitions": len(adapter.store),
            }
            if check is not None:
                stats["kernel_vs_upstream_mean_max_gap_in_std"] = check.max_gap_in_std
            if device.type == "cuda":
                stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results.append(stats)
            print(json.dumps(stats), flush=True)
    summary = {
        "upstream": "XueZeyue/DanceGRPO",
        "preset": args.preset,
        "arch": args.arch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "settings": {**vars(args), **vars(run_args)},
        "steps": results,
        "logs": logs,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
