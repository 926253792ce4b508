"""``TrainConfig``: every knob of ``regclip train``, loadable from JSON or TOML.

Field names are the config-file keys and (with ``-`` for ``_``) the command-line flags.
Defaults follow Flow-GRPO's SD3.5-M recipe (512 px, 10 steps, CFG 4.5, LoRA r=32/alpha=64,
lr 3e-4, ``global_std``); :meth:`TrainConfig.smoke` is the tiny CPU configuration.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_LORA_TARGETS", "TrainConfig"]

DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""The attention projections Flow-GRPO's SD3 LoRA targets (also present in Flux blocks)."""


@dataclass
class TrainConfig:
    # model
    arch: str = "sd3"
    """``"sd3"`` (SD3Transformer2DModel) or ``"flux"`` (FluxTransformer2DModel)."""
    pretrained: str | None = None
    """A diffusers pipeline directory (``transformer/``, ``vae/``, text encoders)."""
    transformer_config: str | dict[str, Any] | None = None
    """Random-weight transformer instead of ``pretrained``: ``"tiny"``, ``"full"`` or a dict."""
    vae: str | None = "pretrained"
    """``"pretrained"`` (``pretrained/vae``), ``"tiny"`` (random, smoke), or ``None`` /
    ``"none"``: the
    reward sees the final latents (B, C, h, w) instead of images."""
    # prompts
    embeddings: str | None = None
    """Precomputed embeddings file (see :mod:`regclip.trainer.prompts`); written here when
    ``prompts`` is given and the file does not exist yet."""
    prompts: str | None = None
    """Text file, one prompt per line, encoded with the pipeline's text encoders."""
    random_prompts: int = 0
    """Use this many random embeddings (smoke tests, benchmarks) instead of real prompts."""
    # sampling
    resolution: int = 512
    num_steps: int = 10
    sde_steps: list[int] | None = None
    """Indices of the stochastic (trained) steps; default all but the last."""
    sde: str = "flow"
    eta: float | None = None
    cfg_scale: float = 4.5
    """Classifier-free guidance scale (SD3 ``guidance_scale``, Flux ``true_cfg_scale``)."""
    embedded_guidance: float = 3.5
    """Flux-dev's embedded guidance value (ignored by SD3)."""
    store_old_means: bool = True
    """Keep the rollout means; False regenerates them from the recorded noise seeds."""
    # batches
    group_size: int = 8
    prompts_per_iteration: int = 2
    batch_size: int = 4
    """Samples per rollout batch = per training micro-batch (same layout in both passes)."""
    accumulate_batches: int = 1
    """Micro-batches per optimizer step (gradients also accumulate over all SDE steps)."""
    passes: int = 1
    """Optimizer passes over each rollout (upstream ``num_inner_epochs``)."""
    # objective
    preset: str = "grpo_guard"
    clip_range: float | None = None
    adv_clip: float = 5.0
    kl_coef: float = 0.0
    advantage_std: str = "global"
    reward: str = "jpeg_compressibility"
    # optimisation
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    full_finetune: bool = False
    mixed_precision: str = "bf16"
    weight_dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    cudnn_attention: bool = True
    """Allow cuDNN scaled-dot-product attention. Set False if the backward pass dies with
    "illegal memory access" (seen for full-size Flux on an H100 with torch 2.11)."""
    # run
    iterations: int = 100
    output_dir: str = "runs/train"
    checkpoint_every: int = 10
    resume: str | None = None
    """A checkpoint directory, or ``"latest"`` (the newest under ``output_dir``)."""
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in ("sd3", "flux"):
            raise ValueError(f"`arch` must be 'sd3' or 'flux', got {self.arch!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"`mixed_precision` must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )
        if self.advantage_std not in ("group", "global"):
            raise ValueError(
                f"`advantage_std` must be 'group' or 'global', got {self.advantage_std!r}"
            )
        for name in (
            "group_size",
            "prompts_per_iteration",
            "batch_size",
            "accumulate_batches",
            "passes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load ``.json`` or ``.toml`` (top-level keys are the fields)."""
        path = Path(path)
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"config file must be .json or .toml, got {path}")
        return cls.from_dict(data)

    @classmethod
    def smoke(cls, arch: str, **overrides: Any) -> TrainConfig:
        """Tiny random-weight CPU run: rollout + one update in seconds."""
        base: dict[str, Any] = {
            "arch": arch,
            "transformer_config": "tiny",
            "vae": "tiny",
            "random_prompts": 2,
            "resolution": 16,
            "num_steps": 4,
            "sde_steps": [0, 1, 2],
            "group_size": 4,
            "prompts_per_iteration": 2,
            "batch_size": 4,
            "lora_rank": 4,
            "lora_alpha": 8,
            "mixed_precision": "no",
            "weight_dtype": "float32",
            "iterations": 1,
            "checkpoint_every": 1,
            "device": "cpu",
            "output_dir": "runs/smoke",
            "cfg_scale": 4.5 if arch == "sd3" else 1.0,
            "clip_range": None,
        }
        base.update(overrides)
        return cls.from_dict(base)
