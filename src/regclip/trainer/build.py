"""Build the trainer's components from a :class:`TrainConfig` (weights on disk or random)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import Architecture, get_architecture
from .config import TrainConfig
from .prompts import PromptSet, encode_prompts, random_prompt_set
from .rewards import RewardFn, load_reward

__all__ = ["TINY_VAE_CONFIG", "Components", "build_components", "dtype_from_name", "tiny_vae"]

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 8),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}
"""A random ``AutoencoderKL`` with SD3's latent scaling (VAE factor 2) for smoke runs."""


def dtype_from_name(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


def tiny_vae(seed: int = 0) -> Any:
    """A random ``AutoencoderKL`` of :data:`TINY_VAE_CONFIG`, its weights drawn from
    ``seed`` without touching the caller's global random state."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**TINY_VAE_CONFIG)


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell (8 for the real VAEs, and when there is no VAE)."""
    if vae is None:
        return 8
    return int(2 ** (len(vae.config.block_out_channels) - 1))


@dataclass
class Components:
    arch: Architecture
    transformer: nn.Module
    vae: Any
    """An ``AutoencoderKL`` or None (rewards then see latents)."""
    prompts: PromptSet
    reward: RewardFn


def _transformer(config: TrainConfig, arch: Architecture, dtype: torch.dtype) -> nn.Module:
    spec = config.transformer_config
    if spec is None:
        if config.pretrained is None:
            raise ValueError(
                "set `pretrained` (a diffusers pipeline directory) or `transformer_config`"
            )
        model: nn.Module = arch.model_class().from_pretrained(  # type: ignore[attr-defined]
            config.pretrained, subfolder="transformer", torch_dtype=dtype
        )
        return model
    if isinstance(spec, str):
        if spec not in ("tiny", "full"):
            raise ValueError(f"`transformer_config` must be 'tiny', 'full' or a dict, got {spec!r}")
        spec = arch.tiny_config if spec == "tiny" else arch.full_config
    with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
        torch.manual_seed(config.seed)
        model = arch.build(dict(spec))
    return model if dtype == torch.float32 else model.to(dtype)


def _vae(config: TrainConfig, dtype: torch.dtype) -> Any:
    if config.vae is None or config.vae == "none":
        return None
    if config.vae == "tiny":
        vae = tiny_vae(config.seed)
        return vae if dtype == torch.float32 else vae.to(dtype)
    if config.vae == "pretrained":
        if config.pretrained is None:
            return None
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(config.pretrained, subfolder="vae", torch_dtype=dtype)
        return vae
    raise ValueError(f"`vae` must be 'pretrained', 'tiny' or null, got {config.vae!r}")


def _prompts(config: TrainConfig, arch: Architecture, model_config: Any, device: str) -> PromptSet:
    if config.random_prompts > 0:
        return random_prompt_set(model_config, config.random_prompts, seq_len=8, seed=config.seed)
    if config.embeddings and Path(config.embeddings).exists():
        return PromptSet.load(config.embeddings)
    if config.prompts is None or config.pretrained is None:
        raise ValueError(
            "no prompts: give `embeddings` (an existing file), or `prompts` and `pretrained` "
            "to encode them, or `random_prompts`"
        )
    texts = [line.strip() for line in Path(config.prompts).read_text().splitlines() if line.strip()]
    negative = "" if config.cfg_scale != 1.0 else None
    prompt_set = encode_prompts(
        arch, config.pretrained, texts, negative_prompt=negative, device=device
    )
    if config.embeddings:
        prompt_set.save(config.embeddings)
    return prompt_set


def build_components(config: TrainConfig, device: str = "cpu") -> Components:
    """Transformer, VAE, prompts and reward described by ``config``."""
    dtype = dtype_from_name(config.weight_dtype)
    vae = _vae(config, dtype)
    arch = get_architecture(config.arch, vae_scale_factor(vae))
    transformer = _transformer(config, arch, dtype)
    prompts = _prompts(config, arch, transformer.config, device)
    return Components(arch, transformer, vae, prompts, load_reward(config.reward))
