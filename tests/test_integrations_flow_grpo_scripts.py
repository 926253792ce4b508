"""The Flow-GRPO adapter on every supported script of commit 9745241, against the real
upstream code (``pytest -m upstream`` with ``REGCLIP_FLOW_GRPO_SRC`` at that checkout).

Each test runs the script's own sampling function (its pipeline and SDE step) on a tiny
random-weight model, builds the rollout batch as the script's ``main`` does, and executes
the ``for j in train_timesteps`` loop of ``main`` from upstream's source: once unpatched,
once under the adapter. Checked: with the vanilla preset the patched gradients and loss are
upstream's; with ``grpo_guard`` they are regclip's loss on upstream's ``compute_log_prob``
outputs and the rollout means (recomputed independently of the adapter's store); the
per-optimizer-step log carries the ``regclip/*`` metrics.

Stand-ins, where the real thing cannot run here: the text encoders (random embeddings; a
random ``encode_prompt`` for Qwen-Image), the rewards, and for Qwen-Image the transformer
(:class:`_QwenStandIn`: upstream calls it with ``txt_seq_lens``, which diffusers 0.42.1's
``QwenImageTransformer2DModel`` does not accept). The Wan rollout returns latents
(``output_type="latent"``) instead of decoding a video for the reward.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from integrations.common import RegclipOptions
from integrations.standins import install_standins

import regclip
from _upstream import NoStep, rel_error, skip_on_missing_dependency, upstream_checkout

SRC, pytestmark = upstream_checkout("REGCLIP_FLOW_GRPO_SRC", "flow_grpo checkout (9745241)")

STEPS = 4  # rollout steps
BATCH = 4


def _upstream(script: str) -> Any:
    install_standins(["absl", "ml_collections", "wandb", "imageio"])
    from integrations.flow_grpo.adapter import FLOW_GRPO_COMMIT_9745241, load_upstream

    assert SRC is not None
    if not (Path(SRC) / "scripts" / f"{script}.py").is_file():
        pytest.skip(f"scripts/{script}.py is not in this checkout: it needs Flow-GRPO 9745241")
    with skip_on_missing_dependency(SRC):
        up = load_upstream(SRC, script)
    assert up.commit == FLOW_GRPO_COMMIT_9745241 or script == "train_sd3"  # also at ac4c86e
    assert up.commit is not None
    return up


class _Prepared(torch.nn.Module):
    """What ``accelerator.prepare`` returns on several GPUs: the model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _Logger:
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def log(self, data, *_, **__):
        self.logs.append({k: float(torch.as_tensor(v).detach()) for k, v in data.items()})


def _loop_code(module):
    tree = ast.parse(inspect.getsource(module.main))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and node.target.id == "j"
            and "train_timesteps" in ast.unparse(node.iter)
        ):
            return compile(ast.Module(body=[node], type_ignores=[]), module.__name__, "exec")
    raise AssertionError("no `for j in ...` loop in main")


def _config(**sample):
    base = {"num_steps": STEPS, "guidance_scale": 3.5, "noise_level": 0.7, "sde_type": "sde"}
    base.update(sample)
    train = {
        "cfg": True,
        "clip_range": 1e-4,
        "adv_clip_max": 5.0,
        "beta": 0.0,
        "max_grad_norm": 1e9,  # upstream clips before the test reads the gradients
        "timestep_fraction": 1.0,
    }
    return SimpleNamespace(
        sample=SimpleNamespace(**base),
        train=SimpleNamespace(**train),
        resolution=16,
        attention_kwargs=None,
    )


def _perturb(module, seed, scale=3e-3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def _advantages(sample, seed, steps):
    rewards = 3 * torch.randn(BATCH, generator=torch.Generator().manual_seed(seed))
    adv = regclip.group_advantages(rewards, torch.arange(BATCH) // 2, gather=False)
    return {**sample, "advantages": adv[:, None].repeat(1, steps)}


# ----------------------------------------------------------------------------- models


def _sd3(up, config, seed):
    from integrations.flow_grpo import smoke

    pipe = smoke.build_pipeline("tiny", seed=seed)
    embeds = smoke.random_embeddings(pipe, BATCH, 8, torch.Generator().manual_seed(seed))
    fast = up.spec.name.endswith("_fast")
    kwargs = dict(
        num_inference_steps=STEPS,
        guidance_scale=config.sample.guidance_scale,
        output_type="pt",
        height=16,
        width=16,
        noise_level=config.sample.noise_level,
    )
    if fast:
        kwargs.update(
            sde_window_size=config.sample.sde_window_size,
            sde_window_range=config.sample.sde_window_range,
            sde_type=config.sample.sde_type,
        )
    with torch.no_grad():
        out = getattr(up.train_module, up.spec.rollout)(pipe, **embeds, **kwargs)
    latents = torch.stack(out[1], dim=1)
    timesteps = (
        torch.stack(out[3]).unsqueeze(0).repeat(BATCH, 1)
        if fast
        else pipe.scheduler.timesteps.repeat(BATCH, 1)
    )
    sample = {
        "prompt_embeds": embeds["prompt_embeds"],
        "pooled_prompt_embeds": embeds["pooled_prompt_embeds"],
        "timesteps": timesteps,
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(out[2], dim=1),
    }
    cond = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
    namespace = {"embeds": cond, "pooled_embeds": pooled, "transformer": pipe.transformer}
    return pipe, sample, namespace


def _flux_pipeline(seed):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    return FluxPipeline(scheduler, vae, None, None, None, None, transformer)


def _flux(up, config, seed):
    pipe = _flux_pipeline(seed)
    g = torch.Generator().manual_seed(seed)
    prompt_embeds = torch.randn(BATCH, 8, 16, generator=g)
    pooled = torch.randn(BATCH, 8, generator=g)
    fast = up.spec.name.endswith("_fast")
    kwargs = dict(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        num_inference_steps=STEPS,
        guidance_scale=config.sample.guidance_scale,
        output_type="pt",
        height=16,
        width=16,
        noise_level=config.sample.noise_level,
    )
    if fast:
        kwargs.update(
            sde_window_size=config.sample.sde_window_size,
            sde_window_range=config.sample.sde_window_range,
            sde_type=config.sample.sde_type,
        )
    with torch.no_grad():
        out = getattr(up.train_module, up.spec.rollout)(pipe, **kwargs)
    _, latents, image_ids, _, log_probs = out[:5]
    latents = torch.stack(latents, dim=1)
    timesteps = (
        torch.stack(out[5]).unsqueeze(0).repeat(BATCH, 1)
        if fast
        else pipe.scheduler.timesteps.repeat(BATCH, 1)
    )
    sample = {
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "image_ids": image_ids.unsqueeze(0).repeat(BATCH, 1, 1),
        "timesteps": timesteps,
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
    }
    return pipe, sample, {"transformer": _Prepared(pipe.transformer)}


def _kontext(up, config, seed):
    from diffusers import FluxKontextPipeline

    flux = _flux_pipeline(seed)
    pipe = FluxKontextPipeline(flux.scheduler, flux.vae, None, None, None, None, flux.transformer)
    g = torch.Generator().manual_seed(seed)
    prompt_embeds = torch.randn(BATCH, 8, 16, generator=g)
    pooled = torch.randn(BATCH, 8, generator=g)
    reference_images = torch.rand(BATCH, 3, 16, 16, generator=g)  # the images to edit
    with torch.no_grad():
        _, latents, latent_ids, text_ids, log_probs, image_latents = getattr(
            up.train_module, up.spec.rollout
        )(
            pipe,
            image=reference_images,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=STEPS,
            guidance_scale=config.sample.guidance_scale,
            output_type="pt",
            height=config.resolution,
            width=config.resolution,
            max_area=config.resolution**2,
            noise_level=config.sample.noise_level,
        )
    latents = torch.stack(latents, dim=1)
    sample = {
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "latent_ids": latent_ids.unsqueeze(0).repeat(BATCH, 1, 1),
        "image_latents": image_latents,
        "text_ids": text_ids.unsqueeze(0).repeat(BATCH, 1, 1),
        "timesteps": pipe.scheduler.timesteps.repeat(BATCH, 1),
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
    }
    return pipe, sample, {"transformer": _Prepared(pipe.transformer)}


def _wan(up, config, seed):
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    # Wan2.1's scheduler config: UniPC with flow sigmas
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler
    )
    g = torch.Generator().manual_seed(seed)
    embeds, negative = (
        torch.randn(BATCH, 8, 16, generator=g),
        torch.randn(BATCH, 8, 16, generator=g),
    )
    with torch.no_grad():
        _, latents, log_probs, _ = getattr(up.train_module, up.spec.rollout)(
            pipe,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=STEPS,
            guidance_scale=config.sample.guidance_scale,
            output_type="latent",  # the reward's video decode is not what is tested
            return_dict=False,
            num_frames=1,
            height=32,
            width=32,
            kl_reward=0,
        )
    latents = torch.stack(latents, dim=1)
    sample = {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "timesteps": pipe.scheduler.timesteps.repeat(BATCH, 1),
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
    }
    namespace = {"embeds": embeds, "negative_embeds": negative, "transformer": pipe.transformer}
    return pipe, sample, namespace


class _QwenStandIn(torch.nn.Module):
    """A tiny velocity model taking the call upstream's Qwen-Image code makes.

    Upstream (written for diffusers 0.35) passes ``txt_seq_lens`` to the transformer,
    which diffusers 0.42.1's ``QwenImageTransformer2DModel.forward`` no longer accepts, so
    the test stands in for the model; the pipeline, SDE step, ``compute_log_prob`` and the
    training loop are upstream's.
    """

    def __init__(self, channels: int = 16, text_dim: int = 16) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=channels, guidance_embeds=False)
        self.latent = torch.nn.Linear(channels, channels)
        self.text = torch.nn.Linear(text_dim, channels)
        self.time = torch.nn.Linear(1, channels)

    @property
    def device(self) -> torch.device:
        return self.latent.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.latent.weight.dtype

    def forward(self, hidden_states, timestep, guidance, encoder_hidden_states_mask,
                encoder_hidden_states, img_shapes, txt_seq_lens, **_):  # fmt: skip
        assert len(txt_seq_lens) == len(hidden_states) == len(img_shapes)
        mask = encoder_hidden_states_mask[..., None].to(encoder_hidden_states.dtype)
        text = (encoder_hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)
        bias = self.text(text) + self.time(timestep[:, None].to(text.dtype))
        return (torch.tanh(self.latent(hidden_states)) + bias[:, None],)


def _qwen(up, config, seed):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    pipe = QwenImagePipeline(scheduler, vae, None, None, _QwenStandIn())
    g = torch.Generator().manual_seed(seed)
    table = {}

    def encode_prompt(prompt, prompt_embeds=None, prompt_embeds_mask=None, **_):
        """A random text encoder: fixed embeddings per string, varying lengths."""
        for text in prompt:
            if text not in table:
                length = 3 + len(table) % 4
                mask = (torch.arange(8) < length).long()
                table[text] = (torch.randn(8, 16, generator=g) * mask[:, None], mask)
        return (
            torch.stack([table[t][0] for t in prompt]),
            torch.stack([table[t][1] for t in prompt]),
        )

    pipe.encode_prompt = encode_prompt
    prompts = [f"prompt {k // 2}" for k in range(BATCH)]
    with torch.no_grad():
        data = getattr(up.train_module, up.spec.rollout)(
            pipe,
            prompts,
            negative_prompt=[" "] * BATCH,
            num_inference_steps=STEPS,
            true_cfg_scale=config.sample.guidance_scale,
            output_type="pt",
            height=config.resolution,
            width=config.resolution,
            noise_level=config.sample.noise_level,
            sde_window_size=config.sample.sde_window_size,
            sde_window_range=config.sample.sde_window_range,
        )
    latents = torch.stack(data["all_latents"], dim=1)
    sample = {
        "prompt_embeds": data["prompt_embeds"],
        "prompt_embeds_mask": data["prompt_embeds_mask"],
        "negative_prompt_embeds": data["negative_prompt_embeds"],
        "negative_prompt_embeds_mask": data["negative_prompt_embeds_mask"],
        "timesteps": torch.stack(data["all_timesteps"]).unsqueeze(0).repeat(BATCH, 1),
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(data["all_log_probs"], dim=1),
    }
    namespace = {"transformer": pipe.transformer, "rank": 0}
    return pipe, sample, namespace


# ----------------------------------------------------------------------------- the check


def _run_loop(up, module, pipe, sample, config, namespace, accelerator_cls, steps):
    ns = {
        **module.__dict__,
        **namespace,
        "tqdm": lambda it, **_: it,
        "train_timesteps": list(range(steps)),
        "accelerator": accelerator_cls(gradient_accumulation_steps=steps),
        "pipeline": pipe,
        "sample": sample,
        "config": config,
        "optimizer": NoStep(),
        "autocast": contextlib.nullcontext,
        "info": defaultdict(list),
        "epoch": 0,
        "inner_epoch": 0,
        "global_step": 0,
        # train_qwenimage.py's FSDP loop: one process, one accumulation window
        "i": 0,
        "num_train_timesteps": steps,
        "gradient_accumulation_steps": steps,
        "rank": 0,
        "local_rank": 0,
        "world_size": 1,
        "is_distributed": False,
    }
    exec(_loop_code(module), ns)
    grads = [p.grad.clone() for p in pipe.transformer.parameters()]
    pipe.transformer.zero_grad(set_to_none=True)
    return grads


def _regclip_reference(up, adapter, pipe, sample, config, namespace, steps, old_means):
    """regclip's loss computed directly on upstream's ``compute_log_prob`` outputs."""
    compute = up.train_module.compute_log_prob
    assert getattr(compute, "__self__", None) is None  # upstream's own, not the adapter's
    sigmas = pipe.scheduler.sigmas.float()
    loss_fn = adapter.loss_fn
    for j in range(steps):
        args = {"transformer": namespace["transformer"], "pipeline": pipe, "sample": sample}
        args.update(
            j=j,
            config=config,
            **{k: namespace[k] for k in namespace if "embeds" in k or k == "rank"},
        )
        _, log_prob, mean, std_dev_t, *extra = compute(**args)
        index = torch.tensor(
            [pipe.scheduler.index_for_timestep(t) for t in sample["timesteps"][:, j]]
        )
        t, dt = sigmas[index], sigmas[index + 1] - sigmas[index]
        s = std_dev_t.flatten()
        if extra:  # Wan: sigma_t and sqrt(-dt)
            s = s * extra[0].flatten()
        elif config.sample.sde_type != "cps":
            s = s * torch.sqrt(-dt)
        out = loss_fn(
            advantages=sample["advantages"][:, j],
            mean=mean,
            old_mean=old_means[j],
            next_sample=sample["next_latents"][:, j],
            std=s.expand(BATCH),
            dt=dt,
            t=t,
            log_prob=log_prob,
            old_log_prob=sample["log_probs"][:, j],
        )
        (out.loss / steps).backward()
    grads = [p.grad.clone() for p in pipe.transformer.parameters()]
    pipe.transformer.zero_grad(set_to_none=True)
    return grads


def _check(up, build, config, seed, monkeypatch):
    from accelerate import Accelerator
    from integrations.flow_grpo.adapter import FlowGRPOAdapter, WanSDE

    random.seed(seed)  # the fast scripts draw their SDE window with `random`
    logger = _Logger()
    monkeypatch.setattr(up.train_module, "wandb", logger)

    class Recording(Accelerator):  # train_wan2_1.py logs through accelerator.log
        def log(self, values, step=None, log_kwargs=None):
            logger.log(values)

    monkeypatch.setattr(up.train_module, "Accelerator", Recording, raising=False)
    vanilla = FlowGRPOAdapter(up, RegclipOptions(preset="flow_grpo"))
    with vanilla:
        pipe, sample, namespace = build(up, config, seed)
    steps = sample["log_probs"].shape[1]
    if up.spec.name.endswith("_fast"):
        assert steps == config.sample.sde_window_size
    assert len(vanilla.store) == BATCH * steps  # only the stochastic (window) steps
    # the rollout means, recomputed by upstream's own training-time function
    with torch.no_grad():
        old_means = []
        for j in range(steps):
            args = {"transformer": namespace["transformer"], "pipeline": pipe, "sample": sample}
            args.update(
                j=j,
                config=config,
                **{k: namespace[k] for k in namespace if "embeds" in k or k == "rank"},
            )
            old_means.append(up.train_module.compute_log_prob(**args)[2])
            recorded = vanilla.store.lookup(sample["next_latents"][:, j], ["mean"])["mean"]
            torch.testing.assert_close(recorded, old_means[j], rtol=1e-4, atol=1e-5)
    _perturb(pipe.transformer, seed + 1)
    sample = _advantages(sample, seed + 2, steps)

    run = lambda module, acc: _run_loop(  # noqa: E731
        up, module, pipe, sample, config, namespace, acc, steps
    )
    theirs = run(up.train_module, Recording)
    with vanilla:
        ours = run(up.train_module, up.train_module.Accelerator)
    assert rel_error(ours, theirs) < 1e-6
    upstream_log, vanilla_log = logger.logs[-2:]
    # train_qwenimage.py logs its loss already divided by gradient_accumulation_steps
    scale = steps if up.spec.backward == "inject" else 1
    assert vanilla_log["regclip/loss"] / scale == pytest.approx(
        upstream_log["loss"], rel=1e-5, abs=1e-7
    )
    assert 0 < upstream_log["clipfrac"] <= 1

    guard = FlowGRPOAdapter(up, RegclipOptions(preset="grpo_guard"))
    guard.store = vanilla.store
    with guard:
        guarded = run(up.train_module, up.train_module.Accelerator)
    log = logger.logs[-1]
    assert guard.loss_fn is not None
    expected_kernel = regclip.CPS if config.sample.sde_type == "cps" else regclip.FlowSDE
    if up.spec.sde == "wan":
        expected_kernel = WanSDE
    assert isinstance(guard.loss_fn.kernel, expected_kernel)
    reference = _regclip_reference(up, guard, pipe, sample, config, namespace, steps, old_means)
    assert rel_error(guarded, reference) < 1e-4
    assert rel_error(guarded, theirs) > 1e-2  # a different loss: the check can fail
    assert {"regclip/loss", "regclip/clip/frac", "regclip/step00/clip/frac"} <= set(log)
    assert f"regclip/step{steps - 1:02d}/ratio/mean" in log
    return log


@pytest.mark.parametrize("seed", [1])
def test_sd3_adapter_runs_upstreams_step(seed, monkeypatch):
    _check(_upstream("train_sd3"), _sd3, _config(), seed, monkeypatch)


@pytest.mark.parametrize(("sde_type", "seed"), [("cps", 2), ("sde", 3)])
def test_sd3_fast_adapter_runs_upstreams_step_in_the_sde_window(sde_type, seed, monkeypatch):
    config = _config(sde_type=sde_type, sde_window_size=2, sde_window_range=(0, 3))
    _check(_upstream("train_sd3_fast"), _sd3, config, seed, monkeypatch)


@pytest.mark.parametrize("seed", [4])
def test_flux_adapter_keeps_the_means_the_pipeline_discards(seed, monkeypatch):
    _check(_upstream("train_flux"), _flux, _config(), seed, monkeypatch)


@pytest.mark.parametrize(("sde_type", "seed"), [("cps", 5), ("sde", 6)])
def test_flux_fast_adapter_runs_upstreams_step_in_the_sde_window(sde_type, seed, monkeypatch):
    config = _config(sde_type=sde_type, sde_window_size=2, sde_window_range=(0, 3))
    _check(_upstream("train_flux_fast"), _flux, config, seed, monkeypatch)


@pytest.mark.parametrize("seed", [7])
def test_wan_adapter_runs_upstreams_step_with_its_own_sde(seed, monkeypatch):
    _check(_upstream("train_wan2_1"), _wan, _config(), seed, monkeypatch)


@pytest.mark.parametrize("seed", [8])
def test_qwenimage_adapter_injects_regclips_loss_into_the_fsdp_loop(seed, monkeypatch):
    config = _config(sde_window_size=0, sde_window_range=(0, STEPS))
    _check(_upstream("train_qwenimage"), _qwen, config, seed, monkeypatch)


@pytest.mark.parametrize("seed", [9])
def test_flux_kontext_adapter_runs_upstreams_edit_step(seed, monkeypatch):
    _check(_upstream("train_flux_kontext"), _kontext, _config(), seed, monkeypatch)
