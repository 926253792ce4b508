"""Rollouts on tiny SD3 / Flux transformers: the training pass reproduces the rollout.

With unchanged weights the recomputed proposal means must equal the recorded ones, so
the recorded log-probs equal the recomputed ones and every preset's ratio is exactly 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regclip import replay
from regclip.kernels import CPS, FlowSDE
from regclip.trainer import (
    Guidance,
    SamplerConfig,
    build_loss,
    get_architecture,
    random_prompt_set,
    recompute_transition,
    sample_rollout,
)

CASES = {
    # name: (arch, config overrides, guidance)
    "sd3-cfg": ("sd3", {}, Guidance(cfg_scale=4.5)),
    "sd3-no-guidance": ("sd3", {}, Guidance(cfg_scale=1.0)),
    "flux-embedded-guidance": ("flux", {"guidance_embeds": True}, Guidance(embedded=3.5)),
    "flux-no-guidance": ("flux", {"guidance_embeds": False}, Guidance()),
    "flux-true-cfg": ("flux", {"guidance_embeds": True}, Guidance(cfg_scale=2.0, embedded=3.5)),
}


def _lora_model(arch_name: str, overrides: dict, seed: int) -> torch.nn.Module:
    """Tiny transformer with an *active* LoRA (random A and B), so the adapter path matters."""
    from peft import LoraConfig

    arch = get_architecture(arch_name, vae_scale_factor=2)
    torch.manual_seed(seed)
    model = arch.build({**arch.tiny_config, **overrides})
    model.add_adapter(
        LoraConfig(
            r=2, lora_alpha=2, init_lora_weights=False, target_modules=["attn.to_q", "attn.to_v"]
        )
    )
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_recomputed_log_probs_equal_recorded_and_ratio_is_one(case: str) -> None:
    arch_name, overrides, guidance = CASES[case]
    seed = int(np.random.default_rng(5).integers(1 << 30))
    arch = get_architecture(arch_name, vae_scale_factor=2)
    model = _lora_model(arch_name, overrides, seed)
    sampler = SamplerConfig(
        num_steps=4, sde_steps=(0, 1, 2), height=16, width=16, guidance=guidance
    )
    sigmas = arch.sigmas(arch.make_scheduler(), sampler.num_steps, 16, 16)
    kernel = FlowSDE.from_sigmas(sigmas, eta=0.7)
    prompts = random_prompt_set(model.config, 2, seq_len=5, seed=seed)
    ids = torch.tensor([0, 0, 1, 1])
    rollout = sample_rollout(
        model,
        arch,
        kernel,
        sigmas,
        prompts.embeds.select(ids),
        ids,
        sampler,
        torch.Generator().manual_seed(seed),
        dtype=torch.float32,
        device=torch.device("cpu"),
        channels=model.config.in_channels,
    )
    assert rollout.latents.shape[:2] == (4, 3)
    assert rollout.old_means is not None
    rollout.advantages = torch.randn(4, generator=torch.Generator().manual_seed(1))
    model.train()
    losses = {name: build_loss(name, kernel, "flow") for name in ("flow_grpo", "grpo_guard")}
    for k in range(rollout.num_sde_steps):
        step = recompute_transition(model, arch, kernel, rollout, k, sampler, dtype=torch.float32)
        assert step.mean.requires_grad
        assert torch.equal(step.mean.detach(), rollout.old_means[:, k])
        torch.testing.assert_close(step.log_prob.detach(), rollout.log_probs[:, k], rtol=0, atol=0)
        for loss_fn in losses.values():
            out = loss_fn(
                advantages=rollout.advantages,
                mean=step.mean,
                old_mean=rollout.old_mean(k),
                next_sample=rollout.next_latents[:, k],
                std=step.std,
                dt=rollout.dt[k].expand(4),
                t=rollout.t[k].expand(4),
            )
            assert torch.equal(out.ratio.detach(), torch.ones(4, dtype=out.ratio.dtype))
            assert not out.clipped.any()


def test_consecutive_sde_steps_chain_and_ode_steps_are_euler() -> None:
    arch = get_architecture("sd3", vae_scale_factor=2)
    torch.manual_seed(0)
    model = arch.build(arch.tiny_config)
    sampler = SamplerConfig(
        num_steps=5, sde_steps=(1, 2), height=16, width=16, guidance=Guidance(1.0)
    )
    sigmas = arch.sigmas(arch.make_scheduler(), 5, 16, 16)
    kernel = FlowSDE.from_sigmas(sigmas)
    embeds = random_prompt_set(model.config, 2, 5).embeds
    ids = torch.tensor([0, 1])
    rollout = sample_rollout(
        model,
        arch,
        kernel,
        sigmas,
        embeds,
        ids,
        sampler,
        torch.Generator().manual_seed(1),
        dtype=torch.float32,
        device=torch.device("cpu"),
        channels=16,
    )
    assert torch.equal(rollout.latents[:, 1], rollout.next_latents[:, 0])
    assert rollout.steps.tolist() == [1, 2]
    torch.testing.assert_close(rollout.t, sigmas[[1, 2]])
    torch.testing.assert_close(rollout.dt, sigmas[[2, 3]] - sigmas[[1, 2]])
    # the last two steps are deterministic Euler steps x + v dt from the last draw
    x = rollout.next_latents[:, 1]
    with torch.no_grad():
        for i in (3, 4):
            v = arch.velocity(model, x, sigmas[i], embeds, sampler.guidance, 16, 16, torch.float32)
            x = x + v * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(rollout.final, x, rtol=0, atol=0)


@pytest.mark.parametrize("kernel_name", ["flow", "cps"])
def test_old_means_regenerated_from_noise_seeds_match_stored(kernel_name: str) -> None:
    arch = get_architecture("flux", vae_scale_factor=2)
    torch.manual_seed(2)
    model = arch.build(arch.tiny_config)
    sigmas = arch.sigmas(arch.make_scheduler(), 4, 16, 16)
    kernel = FlowSDE.from_sigmas(sigmas) if kernel_name == "flow" else CPS(0.7)
    embeds = random_prompt_set(model.config, 1, 5).embeds.select(torch.tensor([0, 0]))
    runs = {}
    for store in (True, False):
        sampler = SamplerConfig(
            num_steps=4, sde_steps=(0, 2), height=16, width=16, store_old_means=store
        )
        runs[store] = sample_rollout(
            model,
            arch,
            kernel,
            sigmas,
            embeds,
            torch.tensor([0, 0]),
            sampler,
            torch.Generator().manual_seed(3),
            dtype=torch.float32,
            device=torch.device("cpu"),
            channels=64,
        )
    assert runs[False].old_means is None
    assert torch.equal(runs[True].next_latents, runs[False].next_latents)
    seeds = runs[False].noise_seeds
    assert seeds.shape == (2,) and seeds.dtype == torch.int64 and seeds.device.type == "cpu"
    for k, step in enumerate(runs[False].steps.tolist()):
        torch.testing.assert_close(
            runs[False].old_mean(k), runs[True].old_mean(k), rtol=1e-5, atol=1e-5
        )
        # the draw is the stored mean plus s_t times the per-sample replay noise of that step
        noise = replay.step_noise(seeds, step, runs[True].next_latents.shape[2:])
        torch.testing.assert_close(
            runs[True].next_latents[:, k],
            runs[True].old_mean(k) + runs[True].std[k] * noise,
            rtol=1e-5,
            atol=1e-5,
        )


def test_flux_sigmas_follow_the_resolution_dependent_shift() -> None:
    arch = get_architecture("flux")
    steps, size = 16, 512
    sigmas = arch.sigmas(arch.make_scheduler(), steps, size, size)
    seq = (size // 16) ** 2
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    base = np.linspace(1.0, 1 / steps, steps)
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert sigmas[-1] == 0


def test_sd3_sigmas_are_shift_3() -> None:
    arch = get_architecture("sd3")
    sigmas = arch.sigmas(arch.make_scheduler(), 10, 512, 512).double().numpy()
    u = sigmas[:-1] / (3 - 2 * sigmas[:-1])  # invert s = 3u / (1 + 2u)
    np.testing.assert_allclose(np.diff(u), np.diff(u)[0], rtol=1e-4)  # uniform before the shift
    assert sigmas[0] == 1 and sigmas[-1] == 0


def test_cfg_without_negative_embeddings_is_an_error() -> None:
    arch = get_architecture("sd3", vae_scale_factor=2)
    model = arch.build(arch.tiny_config)
    embeds = random_prompt_set(model.config, 1, 5, negative=False).embeds
    with pytest.raises(ValueError, match="negative"):
        arch.velocity(
            model,
            torch.zeros(1, 16, 8, 8),
            torch.tensor(1.0),
            embeds,
            Guidance(4.5),
            16,
            16,
            torch.float32,
        )


def test_sampler_config_rejects_steps_outside_the_schedule() -> None:
    with pytest.raises(ValueError, match="sde_steps"):
        SamplerConfig(num_steps=4, sde_steps=(4,))
    with pytest.raises(ValueError, match="empty"):
        SamplerConfig(num_steps=4, sde_steps=())


@pytest.mark.parametrize(("arch_name", "channels"), [("sd3", 16), ("flux", 64)])
def test_initial_latents_are_packed_vae_latents(arch_name: str, channels: int) -> None:
    arch = get_architecture(arch_name, vae_scale_factor=2)
    seed = int(np.random.default_rng(7).integers(1 << 30))
    x = arch.initial_latents(
        3, channels, 16, 32, torch.Generator().manual_seed(seed), torch.device("cpu")
    )
    image = arch.to_image_latents(x, 16, 32)
    expected = torch.randn(
        (3, arch.latent_channels(channels), 8, 16), generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(image, expected)
    assert torch.equal(arch.pack_latents(image), x)
