"""Prompts in: precomputed embeddings, pipeline encoders, or random stand-ins.

An embeddings file is a ``torch.save``\\ d dict with ``prompt_embeds`` (N, L, D_joint),
``pooled`` (N, D_pooled), optionally ``negative_prompt_embeds`` / ``negative_pooled``
(same shapes; needed for classifier-free guidance) and ``prompts`` (N strings).
:func:`encode_prompts` writes one with the pipeline's own text encoders; the trainer then
never loads the encoders again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .arch import Architecture, PromptEmbeds

__all__ = ["PromptSet", "encode_prompts", "random_prompt_set"]


@dataclass(frozen=True)
class PromptSet:
    """N prompts: their embeddings (N rows) and texts (for rewards that read them)."""

    embeds: PromptEmbeds
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.embeds):
            raise ValueError(f"{len(self.texts)} prompt texts for {len(self.embeds)} embeddings")

    def __len__(self) -> int:
        return len(self.texts)

    def save(self, path: str | Path) -> None:
        data: dict[str, Any] = {k: v.cpu() for k, v in self.embeds.as_dict().items()}
        data["prompts"] = list(self.texts)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        data = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"prompt_embeds", "pooled"} - set(data)
        if missing:
            raise ValueError(f"embeddings file {path} lacks {sorted(missing)}")
        embeds = PromptEmbeds(
            data["prompt_embeds"],
            data["pooled"],
            data.get("negative_prompt_embeds"),
            data.get("negative_pooled"),
        )
        texts = tuple(data.get("prompts") or [""] * len(embeds))
        return cls(embeds, texts)


def random_prompt_set(
    model_config: Any, num_prompts: int, seq_len: int, *, negative: bool = True, seed: int = 0
) -> PromptSet:
    """Random embeddings with the shapes a transformer config expects (tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    joint, pooled = model_config["joint_attention_dim"], model_config["pooled_projection_dim"]

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    neg = (
        (draw(num_prompts, seq_len, joint), draw(num_prompts, pooled)) if negative else (None, None)
    )
    embeds = PromptEmbeds(draw(num_prompts, seq_len, joint), draw(num_prompts, pooled), *neg)
    return PromptSet(embeds, tuple(f"prompt {i}" for i in range(num_prompts)))


@torch.no_grad()
def encode_prompts(
    arch: Architecture,
    pretrained: str | Path,
    prompts: Sequence[str],
    *,
    negative_prompt: str | None = "",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 16,
) -> PromptSet:
    """Encode ``prompts`` with the text encoders of the diffusers pipeline in ``pretrained``.

    Loads ``StableDiffusion3Pipeline`` / ``FluxPipeline`` without transformer and VAE. With
    ``negative_prompt`` (``""`` = the unconditional prompt) the negative pair is stored too.
    """
    import diffusers

    pipeline_cls = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[
        arch.name
    ]
    pipe = pipeline_cls.from_pretrained(pretrained, transformer=None, vae=None, torch_dtype=dtype)
    pipe.to(device)
    parts: dict[str, list[torch.Tensor]] = {"pe": [], "pp": [], "npe": [], "npp": []}
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        if arch.name == "sd3":
            pe, npe, pp, npp = pipe.encode_prompt(
                chunk,
                None,
                None,
                device=device,
                do_classifier_free_guidance=negative_prompt is not None,
                negative_prompt=negative_prompt,
            )
        else:
            pe, pp, _ = pipe.encode_prompt(chunk, None, device=device)
            npe = npp = None
            if negative_prompt is not None:
                npe, npp, _ = pipe.encode_prompt(
                    [negative_prompt] * len(chunk), None, device=device
                )
        parts["pe"].append(pe.cpu())
        parts["pp"].append(pp.cpu())
        if npe is not None and npp is not None:
            parts["npe"].append(npe.cpu())
            parts["npp"].append(npp.cpu())
    del pipe
    embeds = PromptEmbeds(
        torch.cat(parts["pe"]),
        torch.cat(parts["pp"]),
        torch.cat(parts["npe"]) if parts["npe"] else None,
        torch.cat(parts["npp"]) if parts["npp"] else None,
    )
    return PromptSet(embeds, tuple(prompts))
