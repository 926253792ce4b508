"""GRPO fine-tuning of diffusers' SD3 / Flux transformers with regclip's losses.

* :mod:`.arch` -- how each diffusers transformer is driven (latent packing, guidance,
  sigma schedule); tiny and full-size configs.
* :mod:`.rollout` -- SDE rollouts on a chosen subset of steps and the exact
  recomputation used for training.
* :mod:`.trainer` -- :class:`GRPOTrainer` (rewards, group advantages, the preset's
  ``GuardedPPOLoss``, LoRA / full fine-tuning, accumulation, EMA, checkpoints).
* :mod:`.rewards`, :mod:`.prompts`, :mod:`.config`, :mod:`.build`, :mod:`.cli`.

The names below load their module on first use, so ``regclip train --help`` works
without the ``train`` extra. See ``docs/training.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES: dict[str, str] = {
    **dict.fromkeys(
        (
            "ARCHITECTURES",
            "Architecture",
            "FluxArchitecture",
            "Guidance",
            "PromptEmbeds",
            "SD3Architecture",
            "get_architecture",
            "model_config",
        ),
        "arch",
    ),
    **dict.fromkeys(("Components", "build_components", "tiny_vae"), "build"),
    "TrainConfig": "config",
    **dict.fromkeys(("PromptSet", "encode_prompts", "random_prompt_set"), "prompts"),
    **dict.fromkeys(
        (
            "REWARDS",
            "RewardFn",
            "colorfulness",
            "jpeg_compressibility",
            "latent_std",
            "load_reward",
        ),
        "rewards",
    ),
    **dict.fromkeys(
        ("Rollout", "SamplerConfig", "recompute_transition", "sample_rollout"), "rollout"
    ),
    **dict.fromkeys(("GRPOTrainer", "build_kernel", "build_loss", "decode_images"), "trainer"),
}
"""Public name -> the submodule defining it."""

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
