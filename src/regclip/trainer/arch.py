"""Architecture adapters: how each diffusers transformer is driven during a rollout.

An :class:`Architecture` knows, for one diffusers model class, the latent layout its
pipeline uses (SD3: ``(B, C, h, w)``; Flux: packed ``(B, h/2 * w/2, 4C)`` tokens), how the
pipeline calls the transformer (timestep scaling, Flux's image/text position ids and
embedded guidance, classifier-free guidance), and the pipeline's
``FlowMatchEulerDiscreteScheduler`` sigma schedule (SD3: static shift 3; Flux: the
resolution-dependent ``mu`` of ``calculate_shift``). Everything is read from or delegated
to diffusers (the pipelines' static helpers), not re-implemented.

Velocity convention: the returned velocity ``v`` is the transformer's prediction
``eps - x0`` after guidance, in float32, shape like the latents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "FluxArchitecture",
    "Guidance",
    "PromptEmbeds",
    "SD3Architecture",
    "get_architecture",
    "model_config",
]


def model_config(model: nn.Module) -> Any:
    """The diffusers ``config`` of a model, through DDP / accelerate wrappers (``.module``)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module  # type: ignore[assignment]
    return model.config


@dataclass(frozen=True)
class PromptEmbeds:
    """Text conditioning of N prompts (one row per prompt or per sample).

    ``prompt_embeds`` (N, L, joint_attention_dim) and ``pooled`` (N, pooled_projection_dim)
    as the pipelines' ``encode_prompt`` returns them; the ``negative_*`` pair (same shapes)
    is needed only for classifier-free guidance.
    """

    prompt_embeds: Tensor
    pooled: Tensor
    negative_prompt_embeds: Tensor | None = None
    negative_pooled: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.prompt_embeds.shape[0]
        if self.pooled.shape[0] != n:
            raise ValueError(f"`pooled` has {self.pooled.shape[0]} rows, expected {n}")
        if (self.negative_prompt_embeds is None) != (self.negative_pooled is None):
            raise ValueError("pass both `negative_prompt_embeds` and `negative_pooled`, or neither")
        if self.negative_prompt_embeds is not None and self.negative_prompt_embeds.shape[0] != n:
            raise ValueError("negative embeddings must have as many rows as `prompt_embeds`")

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def select(self, index: Tensor) -> PromptEmbeds:
        """Rows ``index`` (a (B,) long tensor) of every field."""

        def pick(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index.to(value.device)]

        return PromptEmbeds(
            self.prompt_embeds[index.to(self.prompt_embeds.device)],
            self.pooled[index.to(self.pooled.device)],
            pick(self.negative_prompt_embeds),
            pick(self.negative_pooled),
        )

    def repeat(self, times: int) -> PromptEmbeds:
        """The N rows stacked ``times`` times: (times * N, ...), row ``j * N + i`` = row ``i``."""

        def tile(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.repeat(times, *([1] * (value.dim() - 1)))

        return PromptEmbeds(
            self.prompt_embeds.repeat(times, 1, 1),
            self.pooled.repeat(times, 1),
            tile(self.negative_prompt_embeds),
            tile(self.negative_pooled),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        def move(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.to(device=device, dtype=dtype)

        return replace(
            self,
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
            negative_prompt_embeds=move(self.negative_prompt_embeds),
            negative_pooled=move(self.negative_pooled),
        )

    def as_dict(self) -> dict[str, Tensor]:
        out = {"prompt_embeds": self.prompt_embeds, "pooled": self.pooled}
        if self.negative_prompt_embeds is not None and self.negative_pooled is not None:
            out["negative_prompt_embeds"] = self.negative_prompt_embeds
            out["negative_pooled"] = self.negative_pooled
        return out


@dataclass(frozen=True)
class Guidance:
    """How the velocity is guided.

    ``cfg_scale``: classifier-free guidance ``v = v_neg + w (v_pos - v_neg)`` (needs negative
    embeddings; 1.0 = off). SD3's pipeline calls this ``guidance_scale`` (Flow-GRPO: 4.5);
    Flux's calls it ``true_cfg_scale``. The conditional and unconditional halves run as one
    batch ``[negative; positive]`` in rollout *and* training, so both passes see the same
    shapes. ``embedded``: Flux-dev's distilled guidance value fed to the guidance embedding
    (``guidance_scale`` in ``FluxPipeline``; DanceGRPO: 3.5); ignored by models without one.
    """

    cfg_scale: float = 1.0
    embedded: float = 3.5

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


class Architecture(ABC):
    """One diffusers transformer family (see module docstring)."""

    name: ClassVar[str]
    model_class_name: ClassVar[str]
    full_config: ClassVar[dict[str, Any]]
    """The published full-size transformer config (architecture only, random weights)."""
    tiny_config: ClassVar[dict[str, Any]]
    """A tiny config of the same class for CPU tests and ``--smoke``."""
    repeated_blocks: ClassVar[tuple[str, ...]]
    """Class names of the transformer's repeated blocks (what ``--compile-transformer``
    compiles, one graph per block variant)."""
    scheduler_config: ClassVar[dict[str, Any]]
    """The pipeline's ``FlowMatchEulerDiscreteScheduler`` config."""
    vae_scale_factor: int = 8

    def __init__(self, vae_scale_factor: int = 8) -> None:
        self.vae_scale_factor = vae_scale_factor

    def model_class(self) -> type[nn.Module]:
        import diffusers

        cls: type[nn.Module] = getattr(diffusers, self.model_class_name)
        return cls

    def build(self, config: dict[str, Any]) -> nn.Module:
        """A randomly initialised transformer of this class from ``config``."""
        return self.model_class()(**config)

    def make_scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**self.scheduler_config)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Unpacked latent height and width for an image of ``height x width`` pixels."""
        f = self.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(
                f"height and width must be multiples of {2 * f} (VAE factor {f} x patch 2), "
                f"got {height}x{width}"
            )
        return height // f, width // f

    def initial_latents(
        self,
        batch: int,
        channels: int,
        height: int,
        width: int,
        generator: torch.Generator,
        device: torch.device,
    ) -> Tensor:
        """(B, ...) float32 starting noise in the model's latent layout.

        A (B, C, h, w) standard normal draw from ``generator`` on its own device (``C =
        latent_channels(channels)``, ``(h, w) = latent_hw(height, width)``), put in the
        model's layout by :meth:`pack_latents` and moved to ``device``.
        """
        h, w = self.latent_hw(height, width)
        shape = (batch, self.latent_channels(channels), h, w)
        noise = torch.randn(shape, generator=generator, device=generator.device)
        return self.pack_latents(noise).to(device)

    @abstractmethod
    def latent_channels(self, channels: int) -> int:
        """VAE latent channels C for a transformer with ``in_channels = channels``."""

    @abstractmethod
    def pack_latents(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) VAE latents -> the model's layout (inverse: :meth:`to_image_latents`)."""

    @abstractmethod
    def sigmas(self, scheduler: Any, num_steps: int, height: int, width: int) -> Tensor:
        """(num_steps + 1,) float32 sigmas, ``sigmas[0] = 1`` and ``sigmas[-1] = 0``."""

    @abstractmethod
    def forward(
        self,
        model: nn.Module,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance: Guidance,
        height: int,
        width: int,
    ) -> Tensor:
        """Raw transformer output for one batch (no guidance mixing), model dtype.

        ``sigma`` is (B,), one noise level per row of ``latents``."""

    @abstractmethod
    def to_image_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """(B, C, h, w) latents for the VAE from the model's layout."""

    def velocity(
        self,
        model: nn.Module,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance: Guidance,
        height: int,
        width: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """Guided velocity (B, ...) in float32 at noise level ``sigma``: a 0-d tensor (every
        row at one level) or (B,) (one level per row: several timesteps in one call).

        ``latents`` (float32) are cast to ``dtype``, the model's input precision. With CFG
        the batch ``[negative; positive]`` runs in one forward pass.
        """
        x = latents.to(dtype)
        sigma = sigma.to(latents.device).expand(latents.shape[0])
        if guidance.uses_cfg:
            if not embeds.has_negative:
                raise ValueError("classifier-free guidance needs negative prompt embeddings")
            assert embeds.negative_prompt_embeds is not None and embeds.negative_pooled is not None
            both = PromptEmbeds(
                torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds]),
                torch.cat([embeds.negative_pooled, embeds.pooled]),
            )
            out = self.forward(
                model, torch.cat([x, x]), sigma.repeat(2), both, guidance, height, width
            )
            uncond, cond = out.float().chunk(2)
            return uncond + guidance.cfg_scale * (cond - uncond)
        return self.forward(model, x, sigma, embeds, guidance, height, width).float()


class SD3Architecture(Architecture):
    """``SD3Transformer2DModel`` as ``StableDiffusion3Pipeline`` drives it.

    Latents (B, 16, H/8, W/8); timestep ``sigma * 1000``; static shift 3.
    """

    name = "sd3"
    model_class_name = "SD3Transformer2DModel"
    repeated_blocks = ("JointTransformerBlock",)
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json
    full_config: ClassVar[dict[str, Any]] = {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    }
    tiny_config: ClassVar[dict[str, Any]] = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 24,
        "out_channels": 16,
        "pos_embed_max_size": 16,
        "dual_attention_layers": (0,),
        "qk_norm": "rms_norm",
    }
    scheduler_config: ClassVar[dict[str, Any]] = {"num_train_timesteps": 1000, "shift": 3.0}

    def latent_channels(self, channels: int) -> int:
        return channels

    def pack_latents(self, latents: Tensor) -> Tensor:
        return latents

    def sigmas(self, scheduler: Any, num_steps: int, height: int, width: int) -> Tensor:
        scheduler.set_timesteps(num_steps)
        return scheduler.sigmas.float().cpu()

    def forward(
        self,
        model: nn.Module,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance: Guidance,
        height: int,
        width: int,
    ) -> Tensor:
        dtype = latents.dtype
        timestep = sigma * 1000
        out: Tensor = model(
            hidden_states=latents,
            encoder_hidden_states=embeds.prompt_embeds.to(latents.device, dtype),
            pooled_projections=embeds.pooled.to(latents.device, dtype),
            timestep=timestep,
            return_dict=False,
        )[0]
        return out

    def to_image_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        return latents


class FluxArchitecture(Architecture):
    """``FluxTransformer2DModel`` as ``FluxPipeline`` drives it.

    Latents packed to (B, H/16 * W/16, 64) by ``FluxPipeline._pack_latents``; image ids from
    ``_prepare_latent_image_ids``, text ids zero; timestep ``sigma`` (the pipeline's
    ``t / 1000``); embedded guidance when the config has ``guidance_embeds``; sigmas
    ``linspace(1, 1/N, N)`` shifted by ``mu = calculate_shift(image_seq_len)``.

    The image ids are built on the host, so they are kept per (grid, device, dtype): one
    host-to-device copy per shape instead of one (a synchronisation) per transformer call.
    """

    def __init__(self, vae_scale_factor: int = 8) -> None:
        super().__init__(vae_scale_factor)
        self._image_ids: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    def image_ids(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(h * w, 3) position ids of an ``h x w`` token grid (``FluxPipeline``'s), cached."""
        key = (h, w, device, dtype)
        if key not in self._image_ids:
            ids: Tensor = self._pipeline()._prepare_latent_image_ids(1, h, w, device, dtype)
            self._image_ids[key] = ids
        return self._image_ids[key]

    name = "flux"
    model_class_name = "FluxTransformer2DModel"
    repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    # black-forest-labs/FLUX.1-dev, transformer/config.json
    full_config: ClassVar[dict[str, Any]] = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }
    tiny_config: ClassVar[dict[str, Any]] = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 24,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    }
    scheduler_config: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }

    @staticmethod
    def _pipeline() -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def latent_channels(self, channels: int) -> int:
        return channels // 4  # a token is a 2 x 2 patch of C channels

    def pack_latents(self, latents: Tensor) -> Tensor:
        packed: Tensor = self._pipeline()._pack_latents(latents, *latents.shape)
        return packed

    def sigmas(self, scheduler: Any, num_steps: int, height: int, width: int) -> Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = self.latent_hw(height, width)
        seq_len = (h // 2) * (w // 2)
        cfg = scheduler.config
        mu = calculate_shift(
            seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.float().cpu()

    def forward(
        self,
        model: nn.Module,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance: Guidance,
        height: int,
        width: int,
    ) -> Tensor:
        dtype, device, batch = latents.dtype, latents.device, latents.shape[0]
        h, w = self.latent_hw(height, width)
        img_ids = self.image_ids(h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(embeds.prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        embedded = None
        if model_config(model).guidance_embeds:
            embedded = torch.full((batch,), guidance.embedded, device=device, dtype=torch.float32)
        out: Tensor = model(
            hidden_states=latents,
            encoder_hidden_states=embeds.prompt_embeds.to(device, dtype),
            pooled_projections=embeds.pooled.to(device, dtype),
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=embedded,
            return_dict=False,
        )[0]
        return out

    def to_image_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        unpacked: Tensor = self._pipeline()._unpack_latents(
            latents, height, width, self.vae_scale_factor
        )
        return unpacked


ARCHITECTURES: dict[str, type[Architecture]] = {"sd3": SD3Architecture, "flux": FluxArchitecture}


def get_architecture(name: str, vae_scale_factor: int = 8) -> Architecture:
    """The adapter for ``"sd3"`` or ``"flux"``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](vae_scale_factor)
