"""Drive Flow-GRPO's real rollout and training-step code without its downloads.

``train_sd3.main`` needs SD3.5-M weights, reward servers and datasets. This module runs the
parts the adapter touches -- upstream's ``pipeline_with_logprob`` and the body of the
``for j in train_timesteps`` loop of ``main`` (executed from upstream's own source, found
by :func:`timestep_loop`) -- on a random-weight ``StableDiffusion3Pipeline``: tiny for the
tests, SD3.5-Medium's transformer config for the GPU run. Prompt embeddings are random and
the reward is a stand-in; the numbers measure the machinery, not image quality.

``python -m integrations.flow_grpo.smoke --arch tiny --preset grpo_guard --steps 2``
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import time
from collections import defaultdict
from collections.abc import Callable
from types import CodeType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import regclip
from regclip.trainer.arch import FluxArchitecture, SD3Architecture

from ..common import RegclipOptions
from .adapter import FlowGRPOAdapter, UpstreamFlowGRPO, load_upstream

__all__ = [
    "SD35M_TRANSFORMER",
    "build_flux_pipeline",
    "build_pipeline",
    "flux_rollout",
    "make_config",
    "rollout",
    "run_epoch",
    "run_train_loop",
    "timestep_loop",
]

SD35M_TRANSFORMER: dict[str, Any] = SD3Architecture.full_config
"""``stabilityai/stable-diffusion-3.5-medium`` ``transformer/config.json`` (2.5 B params)."""

# Smaller than the trainer's tiny SD3 config (4 latent channels, one layer, no dual
# attention); the tiny VAE of `build_pipeline` takes its latent channels from it.
TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 8,
    "out_channels": 4,
    "pos_embed_max_size": 16,
}


def build_pipeline(arch: str = "tiny", seed: int = 0, device: str = "cpu") -> Any:
    """Random-weight ``StableDiffusion3Pipeline`` without text encoders (embeddings given),
    built on ``device``; on CUDA the transformer is bf16 (the VAE stays fp32, as upstream)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    config = SD35M_TRANSFORMER if arch == "sd35m" else TINY_TRANSFORMER
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config)
    if device != "cpu":
        transformer.to(torch.bfloat16)
    latent = config["in_channels"]
    if arch == "sd35m":  # SD3's VAE layout: 8x down-sampling, 16 latent channels
        vae_kwargs: dict[str, Any] = dict(
            in_channels=3,
            out_channels=3,
            latent_channels=latent,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        )
    else:
        vae_kwargs = dict(
            in_channels=3,
            out_channels=3,
            latent_channels=latent,
            block_out_channels=(4,),
            layers_per_block=1,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        )
    with torch.device(device):
        vae = AutoencoderKL(**vae_kwargs)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 8,
    "guidance_embeds": False,
    "axes_dims_rope": (2, 2, 4),
}


def build_flux_pipeline(arch: str = "tiny", seed: int = 0, device: str = "cpu") -> Any:
    """Random-weight ``FluxPipeline`` without text encoders: FLUX.1-dev's transformer config
    (``arch="flux"``, 12 B parameters, bf16 on CUDA) and VAE layout, or a tiny one."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    full = arch == "flux"
    config = FluxArchitecture.full_config if full else TINY_FLUX_TRANSFORMER
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # 12 B parameters: never materialize them in fp32
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    blocks = (128, 256, 512, 512) if full else (4, 4)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=config["in_channels"] // 4,
            down_block_types=("DownEncoderBlock2D",) * len(blocks),
            up_block_types=("UpDecoderBlock2D",) * len(blocks),
            block_out_channels=blocks,
            layers_per_block=2 if full else 1,
            norm_num_groups=32 if full else 1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**FluxArchitecture.scheduler_config)
    return FluxPipeline(scheduler, vae, None, None, None, None, transformer)


def make_config(**overrides: Any) -> SimpleNamespace:
    """The fields of Flow-GRPO's ``config/base.py`` that the training step reads."""
    sample = {"num_steps": 4, "guidance_scale": 4.5, "noise_level": 0.7}
    train = {
        "cfg": True,
        "clip_range": 1e-4,
        "adv_clip_max": 5.0,
        "beta": 0.0,
        "max_grad_norm": 1.0,
        "timestep_fraction": 1.0,
    }
    for key, value in overrides.items():
        group, name = key.split("__")
        (sample if group == "sample" else train)[name] = value
    return SimpleNamespace(sample=SimpleNamespace(**sample), train=SimpleNamespace(**train))


def random_embeddings(
    pipeline: Any, batch: int, seq: int, generator: torch.Generator
) -> dict[str, Tensor]:
    cfg = pipeline.transformer.config
    device, dtype = pipeline.transformer.device, pipeline.transformer.dtype

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return {
        "prompt_embeds": draw(batch, seq, cfg.joint_attention_dim),
        "pooled_prompt_embeds": draw(batch, cfg.pooled_projection_dim),
        "negative_prompt_embeds": draw(1, seq, cfg.joint_attention_dim).expand(batch, -1, -1),
        "negative_pooled_prompt_embeds": draw(1, cfg.pooled_projection_dim).expand(batch, -1),
    }


def autocast(device: torch.device) -> Any:
    """What ``accelerator.prepare``'s bf16 mixed precision gives upstream's forward passes."""
    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()


def rollout(
    up: UpstreamFlowGRPO,
    pipeline: Any,
    embeds: dict[str, Tensor],
    config: SimpleNamespace,
    resolution: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Upstream's sampling call and the sample dict ``main`` builds from it."""
    with autocast(pipeline.transformer.device):
        images, latents, log_probs = up.train_module.pipeline_with_logprob(
            pipeline,
            **embeds,
            num_inference_steps=config.sample.num_steps,
            guidance_scale=config.sample.guidance_scale,
            output_type="pt",
            height=resolution,
            width=resolution,
            noise_level=config.sample.noise_level,
        )
    latents = torch.stack(latents, dim=1)
    batch = latents.shape[0]
    sample = {
        "prompt_embeds": embeds["prompt_embeds"],
        "pooled_prompt_embeds": embeds["pooled_prompt_embeds"],
        "timesteps": pipeline.scheduler.timesteps.repeat(batch, 1),
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
    }
    return images, sample


def timestep_loop(up: UpstreamFlowGRPO) -> CodeType:
    """The ``for j in tqdm(train_timesteps, ...)`` loop of upstream's ``main``, compiled
    from upstream's source (it computes the loss, calls ``accelerator.backward`` and logs)."""
    tree = ast.parse(inspect.getsource(up.train_module.main))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and node.target.id == "j"
            and "train_timesteps" in ast.unparse(node.iter)
        ):
            return compile(ast.Module(body=[node], type_ignores=[]), "train_sd3.main", "exec")
    raise RuntimeError("train_sd3.main has no `for j in ...` loop")


def run_timestep_loop(
    up: UpstreamFlowGRPO,
    pipeline: Any,
    sample: dict[str, Tensor],
    config: SimpleNamespace,
    accelerator: Any,
    optimizer: Any,
    neg: dict[str, Tensor],
    global_step: int = 0,
    transformer: Any = None,
) -> int:
    """Execute upstream's loop for one training batch; returns the new ``global_step``.

    ``transformer`` is what ``main`` calls it after ``accelerator.prepare`` (default:
    ``pipeline.transformer``); the ``beta > 0`` branch needs ``transformer.module``."""
    embeds = torch.cat(
        [neg["negative_prompt_embeds"][: len(sample["prompt_embeds"])], sample["prompt_embeds"]]
    )
    pooled = torch.cat(
        [
            neg["negative_pooled_prompt_embeds"][: len(sample["prompt_embeds"])],
            sample["pooled_prompt_embeds"],
        ]
    )
    namespace = {
        **up.train_module.__dict__,
        "tqdm": lambda it, **_: it,
        "train_timesteps": list(
            range(int(config.sample.num_steps * config.train.timestep_fraction))
        ),
        "accelerator": accelerator,
        "transformer": pipeline.transformer if transformer is None else transformer,
        "pipeline": pipeline,
        "sample": sample,
        "embeds": embeds,
        "pooled_embeds": pooled,
        "config": config,
        "optimizer": optimizer,
        "autocast": lambda: autocast(pipeline.transformer.device),
        "info": defaultdict(list),
        "epoch": 0,
        "inner_epoch": 0,
        "global_step": global_step,
    }
    exec(timestep_loop(up), namespace)
    return int(namespace["global_step"])


def flux_rollout(
    up: UpstreamFlowGRPO,
    pipeline: Any,
    config: SimpleNamespace,
    *,
    batch: int,
    seq: int,
    resolution: int,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``train_flux.py``'s sampling call on random prompt embeddings, and the sample dict
    its ``main`` builds from it."""
    cfg = pipeline.transformer.config
    device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
    prompt_embeds = torch.randn(batch, seq, cfg.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=generator)
    prompt_embeds, pooled = prompt_embeds.to(device, dtype), pooled.to(device, dtype)
    with autocast(device):
        images, latents, image_ids, _, log_probs = getattr(up.train_module, up.spec.rollout)(
            pipeline,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=config.sample.num_steps,
            guidance_scale=config.sample.guidance_scale,
            output_type="pt",
            height=resolution,
            width=resolution,
            noise_level=config.sample.noise_level,
        )
    stacked = torch.stack(latents, dim=1)
    sample = {
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "image_ids": image_ids.unsqueeze(0).repeat(batch, 1, 1),
        "timesteps": pipeline.scheduler.timesteps.repeat(batch, 1),
        "latents": stacked[:, :-1],
        "next_latents": stacked[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
    }
    return images, sample


def run_train_loop(
    up: UpstreamFlowGRPO,
    pipeline: Any,
    sample: dict[str, Tensor],
    config: SimpleNamespace,
    accelerator: Any,
    optimizer: Any,
    steps: int,
    **names: Any,
) -> int:
    """Execute the ``for j in train_timesteps`` loop of any supported script's ``main`` for
    one training batch over ``steps`` timesteps; ``names`` are the loop's other free names
    (``transformer``, and ``embeds``/``pooled_embeds`` for SD3). Returns ``global_step``."""
    namespace = {
        **up.train_module.__dict__,
        "tqdm": lambda it, **_: it,
        "train_timesteps": list(range(steps)),
        "accelerator": accelerator,
        "transformer": pipeline.transformer,
        "pipeline": pipeline,
        "sample": sample,
        "config": config,
        "optimizer": optimizer,
        "autocast": lambda: autocast(pipeline.transformer.device),
        "info": defaultdict(list),
        "epoch": 0,
        "inner_epoch": 0,
        "global_step": 0,
        **names,
    }
    exec(timestep_loop(up), namespace)
    return int(namespace["global_step"])


def with_advantages(
    sample: dict[str, Tensor], rewards: Tensor, group: int, steps: int
) -> dict[str, Tensor]:
    groups = torch.arange(len(rewards)) // group
    adv = regclip.group_advantages(rewards.float().cpu(), groups, gather=False)
    return {**sample, "advantages": adv[:, None].repeat(1, steps).to(sample["latents"].device)}


class RecordingLogger:
    """Stand-in for ``wandb``: keeps what upstream logs."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def log(self, data: dict[str, Any], step: int | None = None, **_: Any) -> None:
        self.logs.append({k: float(torch.as_tensor(v).detach()) for k, v in data.items()})

    def init(self, **_: Any) -> None:
        return None


def run_epoch(
    up: UpstreamFlowGRPO,
    pipeline: Any,
    config: SimpleNamespace,
    *,
    batch: int,
    group: int,
    resolution: int,
    seq: int,
    inner_epochs: int,
    optimizer: Any,
    accelerator_cls: Callable[..., Any],
    reward: Callable[[Tensor], Tensor],
    generator: torch.Generator,
    train_batches: int = 1,
) -> dict[str, Any]:
    """One epoch as ``main`` runs it: rollout, advantages, then ``train_batches`` shuffled
    training batches with one optimizer step each (``gradient_accumulation_steps = 1``)."""
    embeds = random_embeddings(pipeline, batch // group, seq, generator)
    embeds = {k: v.repeat_interleave(group, 0) for k, v in embeds.items()}
    timer = _Timer(pipeline.transformer.device)
    with timer("rollout"), torch.no_grad():
        images, sample = rollout(up, pipeline, embeds, config, resolution)
    steps = int(config.sample.num_steps * config.train.timestep_fraction)
    sample = with_advantages(sample, reward(images), group, steps)
    accelerator = accelerator_cls(gradient_accumulation_steps=steps)
    global_step = 0
    with timer("train"):
        for _ in range(inner_epochs):
            for rows in torch.randperm(batch).chunk(train_batches):
                chunk = {k: v[rows.to(v.device)] for k, v in sample.items()}
                global_step = run_timestep_loop(
                    up, pipeline, chunk, config, accelerator, optimizer, embeds, global_step
                )
    return {"seconds": timer.seconds, "optimizer_steps": global_step}


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", default=None)
    parser.add_argument("--arch", choices=["tiny", "sd35m"], default="tiny")
    parser.add_argument("--preset", default="grpo_guard")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--num_steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--train_batches", type=int, default=2, help="optimizer steps per epoch")
    parser.add_argument(
        "--lora_rank", type=int, default=0, help="train LoRA adapters (peft) as upstream does"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from ..standins import install_standins

    install_standins(["absl", "ml_collections", "wandb"])
    up = load_upstream(args.src)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = build_pipeline(args.arch, device=device)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        pipeline.transformer.requires_grad_(False)
        pipeline.transformer = get_peft_model(
            pipeline.transformer,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"],
            ),
        )
    params = [p for p in pipeline.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    config = make_config(sample__num_steps=args.num_steps)
    logger = RecordingLogger()
    up.train_module.wandb = logger
    options = RegclipOptions(preset=args.preset)
    generator = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    with FlowGRPOAdapter(up, options) as adapter:
        accelerator_cls = up.train_module.Accelerator
        mixed = "bf16" if device == "cuda" else "no"
        for epoch in range(args.epochs):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            stats = run_epoch(
                up,
                pipeline,
                config,
                batch=args.batch,
                group=args.group,
                resolution=args.resolution,
                seq=args.seq,
                inner_epochs=1,
                optimizer=optimizer,
                accelerator_cls=lambda **kw: accelerator_cls(mixed_precision=mixed, **kw),
                reward=lambda images: images.float().mean(dim=(1, 2, 3)).cpu(),
                generator=generator,
                train_batches=args.train_batches,
            )
            stats["epoch"] = epoch
            stats["stored_transitions"] = len(adapter.store)
            if device == "cuda":
                stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results.append(stats)
            print(json.dumps(stats), flush=True)
    summary = {
        "upstream": "yifan123/flow_grpo",
        "preset": args.preset,
        "arch": args.arch,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "settings": vars(args),
        "epochs": results,
        "logs": logger.logs,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
