"""``TrainConfig``: every knob of ``regclip train``, loadable from JSON or TOML.

Field names are the config-file keys and (with ``-`` for ``_``) the command-line flags;
each field's ``metadata`` carries its help text, its choices and its allowed range, which
``regclip train --help`` prints and both the CLI and :meth:`TrainConfig.__post_init__`
check. A bad value raises :class:`ConfigError`, which names the field.
Defaults follow Flow-GRPO's SD3.5-M recipe (512 px, 10 steps, CFG 4.5, LoRA r=32/alpha=64,
lr 3e-4, ``global_std``); :meth:`TrainConfig.smoke` is the tiny CPU configuration.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..presets import PRESETS

__all__ = [
    "ARCH_NAMES",
    "DEFAULT_LORA_TARGETS",
    "REWARD_NAMES",
    "ConfigError",
    "Range",
    "TrainConfig",
]

ARCH_NAMES: tuple[str, ...] = ("sd3", "flux")
"""The architectures of :data:`regclip.trainer.arch.ARCHITECTURES` (kept here so the
config and ``--help`` need no diffusers)."""
REWARD_NAMES: tuple[str, ...] = ("jpeg_compressibility", "colorfulness", "latent_std")
"""The built-in rewards of :data:`regclip.trainer.rewards.REWARDS`."""
SDE_NAMES: tuple[str, ...] = ("flow", "dance", "cps")
VAE_FACTORS: dict[str, int] = {"pretrained": 8, "tiny": 2, "none": 8}
"""Pixels per latent cell for each ``vae`` choice: SD3's and Flux's VAEs downsample by 8,
the smoke runs' tiny VAE by 2; without a VAE the latents keep the real VAEs' shape."""
PATCH = 2
"""Latent cells per transformer patch side (SD3's ``patch_size``; Flux packs 2 x 2)."""

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


class ConfigError(ValueError):
    """A bad :class:`TrainConfig` value; ``field`` names it (the CLI prints its flag)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"`{field_name}` {message}")
        self.field = field_name
        self.detail = message


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``low``/``high`` bounds, open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "must be " + " and ".join(parts)


def _typed(name: str, annotation: str, value: Any) -> Any:
    """``value`` as field ``name`` of type ``annotation`` holds it (an integer for a float
    field becomes a float, a tuple for a list field a list); a :class:`ConfigError` when it
    has the wrong type, e.g. a string from a mistyped TOML value."""
    if isinstance(value, tuple):
        value = list(value)
    if annotation.startswith("list["):
        item = int if annotation.startswith("list[int]") else str
        if isinstance(value, list) and all(_is(v, item) for v in value):
            return value
        expected = "a list of integers" if item is int else "a list of strings"
    elif annotation.startswith("str | dict"):
        if isinstance(value, (str, dict)):
            return value
        expected = "a string or a table"
    else:
        kind = {"bool": bool, "int": int, "float": float}.get(annotation.split(" ")[0], str)
        if kind is float and _is(value, int):
            value = float(value)
        if _is(value, kind):
            if kind is float and not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value!r}")
            return value
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(
            kind, "a string"
        )
    raise ConfigError(name, f"must be {expected}, got {value!r} ({type(value).__name__})")


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` where a bool is not an integer."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)


def _field(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None,
           range: Range | None = None, factory: Any = None) -> Any:  # fmt: skip
    """A dataclass field whose metadata holds its help text, choices and range."""
    metadata = {"help": help, "choices": choices, "range": range}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # model
    arch: str = _field("sd3", "transformer architecture: sd3 (SD3Transformer2DModel) or flux "
                       "(FluxTransformer2DModel)", choices=ARCH_NAMES)  # fmt: skip
    pretrained: str | None = _field(
        None, "a diffusers pipeline directory (transformer/, vae/, text encoders)"
    )
    transformer_config: str | dict[str, Any] | None = _field(
        None, "random-weight transformer instead of --pretrained: 'tiny', 'full' or a JSON dict"
    )
    vae: str | None = _field(
        "pretrained",
        "'pretrained' (from --pretrained), 'tiny' (random, smoke runs) or 'none': the reward "
        "then sees the final latents instead of images (null: as 'none')",
        choices=tuple(VAE_FACTORS),
    )
    # prompts
    embeddings: str | None = _field(
        None,
        "precomputed prompt-embeddings file; written here when --prompts is given and the "
        "file does not exist yet",
    )
    prompts: str | None = _field(
        None, "text file, one prompt per line, encoded with the pipeline's text encoders"
    )
    random_prompts: int = _field(
        0, "use this many random prompt embeddings instead of real prompts (smoke runs)",
        range=AT_LEAST_0,
    )  # fmt: skip
    # sampling
    resolution: int = _field(
        512, "image height and width in pixels; a multiple of 16 (of 4 with --vae tiny)",
        range=Range(16),
    )  # fmt: skip
    num_steps: int = _field(10, "sampling steps per image", range=Range(2))
    sde_steps: list[int] | None = _field(
        None, "indices of the stochastic (trained) steps, 0 = first; default all but the last"
    )
    sde: str = _field(
        "flow", "SDE of the rollout: flow (Flow-GRPO), dance (DanceGRPO) or cps",
        choices=SDE_NAMES,
    )  # fmt: skip
    eta: float | None = _field(
        None, "SDE noise level (default: the SDE's upstream default, 0.7 / 0.3 / 0.7)",
        range=POSITIVE,
    )  # fmt: skip
    cfg_scale: float = _field(
        4.5, "classifier-free guidance scale (SD3 guidance_scale, Flux true_cfg_scale); "
        "1 turns it off", range=Range(1),
    )  # fmt: skip
    embedded_guidance: float = _field(
        3.5, "Flux-dev's embedded guidance value (ignored by SD3)", range=AT_LEAST_0
    )
    store_old_means: bool = _field(
        True, "keep the rollout means (--no-store-old-means regenerates them from the noise "
        "seeds)",
    )  # fmt: skip
    # batches
    group_size: int = _field(
        8, "samples per prompt; advantages compare the samples of one prompt, so >= 2",
        range=Range(2),
    )  # fmt: skip
    prompts_per_iteration: int = _field(2, "prompts per iteration", range=AT_LEAST_1)
    batch_size: int = _field(
        4, "samples per rollout batch and per training micro-batch", range=AT_LEAST_1
    )
    accumulate_batches: int = _field(
        1, "micro-batches per optimizer step (gradients also accumulate over the SDE steps)",
        range=AT_LEAST_1,
    )  # fmt: skip
    passes: int = _field(
        1, "optimizer passes over each rollout (upstream num_inner_epochs)", range=AT_LEAST_1
    )
    # objective
    preset: str = _field("grpo_guard", "the loss, a regclip preset", choices=tuple(sorted(PRESETS)))
    clip_range: float | None = _field(
        None, "PPO clip range (default: the preset's own, e.g. 2e-6 for grpo_guard)",
        range=POSITIVE,
    )  # fmt: skip
    adv_clip: float = _field(5.0, "clamp advantages to [-adv_clip, adv_clip]", range=POSITIVE)
    kl_coef: float = _field(
        0.0, "weight of the KL to the adapter-free base model (0: no KL; LoRA only)",
        range=AT_LEAST_0,
    )  # fmt: skip
    advantage_std: str = _field(
        "global", "normalize advantages by the std of all rewards (global) or of each "
        "prompt's group (group)", choices=("global", "group"),
    )  # fmt: skip
    reward: str = _field(
        "jpeg_compressibility",
        f"reward: one of {', '.join(REWARD_NAMES)}, or 'package.module:function'",
    )
    # optimisation
    lr: float = _field(3e-4, "AdamW learning rate", range=POSITIVE)
    weight_decay: float = _field(1e-4, "AdamW weight decay", range=AT_LEAST_0)
    max_grad_norm: float = _field(1.0, "gradient-norm clip", range=POSITIVE)
    lora_rank: int = _field(32, "LoRA rank", range=AT_LEAST_1)
    lora_alpha: int = _field(64, "LoRA alpha", range=AT_LEAST_1)
    lora_targets: list[str] = _field(
        help="module names the LoRA adapts (default: the attention projections)",
        factory=lambda: list(DEFAULT_LORA_TARGETS),
    )
    full_finetune: bool = _field(False, "train every transformer weight instead of a LoRA")
    mixed_precision: str = _field(
        "bf16", "accelerate's mixed precision", choices=("no", "bf16", "fp16")
    )
    weight_dtype: str = _field(
        "bfloat16", "dtype of the frozen weights", choices=("float32", "bfloat16", "float16")
    )
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward pass")
    timesteps_per_call: int = _field(
        1, "trained timesteps stacked into one transformer call in the update (batch_size x "
        "this many rows: same gradient as one call per timestep, faster, more memory)",
        range=AT_LEAST_1,
    )  # fmt: skip
    compile_transformer: bool = _field(
        False,
        "torch.compile the transformer's repeated blocks (regional compilation; the "
        "first calls of each block variant, shape and grad mode compile)",
    )
    ema_decay: float | None = _field(
        None, "keep an EMA of the trained weights with this decay (default: none)",
        range=Range(0, 1, low_open=True, high_open=True),
    )  # fmt: skip
    cudnn_attention: bool = _field(
        True,
        "allow cuDNN scaled-dot-product attention; --no-cudnn-attention keeps the trainer's "
        "transformer calls off it (a workaround for 'illegal memory access' in the Flux "
        "backward seen on an H100 with torch 2.11)",
    )
    # run
    iterations: int = _field(100, "training iterations (rollout + update)", range=AT_LEAST_1)
    output_dir: str = _field("runs/train", "folder for metrics.jsonl and checkpoints")
    checkpoint_every: int = _field(
        10, "save a checkpoint every this many iterations (0: only at the end)",
        range=AT_LEAST_0,
    )  # fmt: skip
    resume: str | None = _field(
        None, "a checkpoint folder to resume from, or 'latest' (the newest in --output-dir)"
    )
    seed: int = _field(0, "seed of the prompts, rollouts and random weights", range=AT_LEAST_0)
    device: str | None = _field(
        None, "device, e.g. cuda, cuda:1 or cpu (default: accelerate's choice, cuda)"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                if "None" not in str(f.type):
                    raise ConfigError(f.name, "must be set, got null")
                continue
            value = _typed(f.name, str(f.type), value)
            setattr(self, f.name, value)
            choices, bounds = f.metadata["choices"], f.metadata["range"]
            if choices is not None and value not in choices:
                raise ConfigError(f.name, f"must be one of {', '.join(choices)}, got {value!r}")
            if bounds is not None and not bounds.contains(value):
                raise ConfigError(f.name, f"{bounds.describe()}, got {value!r}")
        if ":" not in self.reward and self.reward not in REWARD_NAMES:
            raise ConfigError(
                "reward",
                f"must be one of {', '.join(REWARD_NAMES)} or 'package.module:function', "
                f"got {self.reward!r}",
            )
        if self.sde_steps is not None:
            bad = [k for k in self.sde_steps if not 0 <= k < self.num_steps]
            if bad or not self.sde_steps:
                raise ConfigError(
                    "sde_steps",
                    f"must list step indices in [0, {self.num_steps - 1}], got {self.sde_steps}",
                )
        vae = self.vae or "none"
        multiple = VAE_FACTORS[vae] * PATCH
        if self.resolution % multiple:
            raise ConfigError(
                "resolution",
                f"must be a multiple of {multiple} (VAE factor {VAE_FACTORS[vae]} of "
                f"--vae {vae} x patch {PATCH}), got {self.resolution}",
            )
        if self.kl_coef > 0 and self.full_finetune:
            raise ConfigError(
                "kl_coef",
                f"is {self.kl_coef}, but the KL's reference is the adapter-free base model, "
                "which --full-finetune does not keep: train a LoRA or set --kl-coef 0",
            )
        if isinstance(self.transformer_config, str) and self.transformer_config not in (
            "tiny",
            "full",
        ):
            raise ConfigError(
                "transformer_config", f"must be 'tiny', 'full' or a dict, got "
                f"{self.transformer_config!r}",
            )  # fmt: skip

    def check_batches(self, world_size: int) -> None:
        """The samples of an iteration, ``prompts_per_iteration * group_size``, must split
        into ``world_size`` ranks x whole batches of ``batch_size`` x
        ``accumulate_batches``; raises a :class:`ConfigError` on ``batch_size`` otherwise."""
        samples = self.prompts_per_iteration * self.group_size
        unit = world_size * self.batch_size * self.accumulate_batches
        if samples % unit:
            raise ConfigError(
                "batch_size",
                f"is {self.batch_size}, but prompts_per_iteration x group_size = {samples} "
                f"samples do not split into {world_size} rank(s) x batches of "
                f"{self.batch_size} x accumulate_batches {self.accumulate_batches} = {unit}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(unknown[0], f"is not a config key{hint} (unknown keys: {unknown})")
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
        """Tiny random-weight CPU run: rollout + one update in seconds, written to
        ``runs/smoke/<arch>`` unless ``output_dir`` is given."""
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
            "output_dir": f"runs/smoke/{arch}",
            "cfg_scale": 4.5 if arch == "sd3" else 1.0,
            "clip_range": None,
        }
        base.update(overrides)
        return cls.from_dict(base)
