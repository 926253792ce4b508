"""GRPO fine-tuning of diffusers' SD3 / Flux transformers with regclip's losses.

* :mod:`.arch` -- how each diffusers transformer is driven (latent packing, guidance,
  sigma schedule); tiny and full-size configs.
* :mod:`.rollout` -- SDE rollouts on a chosen subset of steps and the exact
  recomputation used for training.
* :mod:`.trainer` -- :class:`GRPOTrainer` (rewards, group advantages, the preset's
  ``GuardedPPOLoss``, LoRA / full fine-tuning, accumulation, EMA, checkpoints).
* :mod:`.rewards`, :mod:`.prompts`, :mod:`.config`, :mod:`.build`, :mod:`.cli`.

See ``docs/training.md``.
"""

from .arch import (
    ARCHITECTURES,
    Architecture,
    FluxArchitecture,
    Guidance,
    PromptEmbeds,
    SD3Architecture,
    get_architecture,
    model_config,
)
from .build import Components, build_components, tiny_vae
from .config import TrainConfig
from .prompts import PromptSet, encode_prompts, random_prompt_set
from .rewards import REWARDS, RewardFn, colorfulness, jpeg_compressibility, latent_std, load_reward
from .rollout import Rollout, SamplerConfig, recompute_transition, sample_rollout
from .trainer import GRPOTrainer, build_kernel, build_loss, decode_images

__all__ = [
    "ARCHITECTURES",
    "REWARDS",
    "Architecture",
    "Components",
    "FluxArchitecture",
    "GRPOTrainer",
    "Guidance",
    "PromptEmbeds",
    "PromptSet",
    "RewardFn",
    "Rollout",
    "SD3Architecture",
    "SamplerConfig",
    "TrainConfig",
    "build_components",
    "build_kernel",
    "build_loss",
    "colorfulness",
    "decode_images",
    "encode_prompts",
    "get_architecture",
    "jpeg_compressibility",
    "latent_std",
    "load_reward",
    "model_config",
    "random_prompt_set",
    "recompute_transition",
    "sample_rollout",
    "tiny_vae",
]
