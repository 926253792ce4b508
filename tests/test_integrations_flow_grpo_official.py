"""Parity with the GRPO-Guard authors' own script, ``scripts/train_sd3_GRPO_Guard.py`` of
Flow-GRPO 9745241 (``pytest -m upstream`` with ``REGCLIP_FLOW_GRPO_SRC`` at that checkout).

The authors' training step -- the ``for j in train_timesteps`` loop of their ``main``, run
from their source with ``rationorm=True`` -- and ``train_sd3.py``'s loop under the adapter
with ``--regclip_preset grpo_guard_official`` train the same tiny random-weight SD3 on the
same rollout; their gradients and losses must agree. regclip's per-sample ``grpo_guard``
must not (the batch-mean bias is what differs).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from integrations.common import RegclipOptions
from integrations.standins import install_standins

from _upstream import NoStep, rel_error, skip_on_missing_dependency, take_grads, upstream_checkout

SRC, pytestmark = upstream_checkout("REGCLIP_FLOW_GRPO_SRC", "flow_grpo checkout (9745241)")

STEPS = 4


@pytest.fixture(scope="module")
def up():
    install_standins(["absl", "ml_collections", "wandb"])
    from integrations.flow_grpo.adapter import load_upstream

    with skip_on_missing_dependency(SRC):
        return load_upstream(SRC)


@pytest.fixture(scope="module")
def authors(up):
    from integrations.flow_grpo.adapter import import_script

    script = Path(up.root) / "scripts" / "train_sd3_GRPO_Guard.py"
    if not script.is_file():
        pytest.skip(f"{script} is not in this checkout: it needs Flow-GRPO 9745241")
    return import_script(up.root, "train_sd3_GRPO_Guard")


def _rollout(up, pipe, embeds, config):
    """``main``'s rollout as the authors' script makes it (``return_prev_sample_mean``),
    through ``train_sd3``'s sampling function (patched when the adapter is installed)."""
    with torch.no_grad():
        _, latents, log_probs, means = up.train_module.pipeline_with_logprob(
            pipe,
            **embeds,
            num_inference_steps=STEPS,
            guidance_scale=config.sample.guidance_scale,
            output_type="pt",
            height=16,
            width=16,
            noise_level=config.sample.noise_level,
            return_prev_sample_mean=True,
        )
    latents = torch.stack(latents, dim=1)
    return {
        "prompt_embeds": embeds["prompt_embeds"],
        "pooled_prompt_embeds": embeds["pooled_prompt_embeds"],
        "timesteps": pipe.scheduler.timesteps.repeat(len(latents), 1),
        "latents": latents[:, :-1],
        "next_latents": latents[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
        "prev_sample_mean": torch.stack(means, dim=1),
    }


def _setup(up, seed, clip_range):
    from integrations.flow_grpo import smoke

    pipe = smoke.build_pipeline("tiny", seed=seed)
    config = smoke.make_config(sample__num_steps=STEPS, train__clip_range=clip_range)
    config.rationorm = True
    embeds = smoke.random_embeddings(pipe, 6, 8, torch.Generator().manual_seed(seed))
    return pipe, config, embeds


def _run(up, module, pipe, sample, config, embeds, accelerator_cls):
    from integrations.flow_grpo import smoke

    accelerator = accelerator_cls(gradient_accumulation_steps=STEPS)
    smoke.run_timestep_loop(
        SimpleNamespace(train_module=module), pipe, sample, config, accelerator, NoStep(), embeds
    )
    return take_grads(pipe.transformer)


@pytest.mark.parametrize("seed", [11, 12])
def test_official_preset_reproduces_the_authors_grpo_guard_step(up, authors, monkeypatch, seed):
    from accelerate import Accelerator
    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter

    authors_log, adapter_log = smoke.RecordingLogger(), smoke.RecordingLogger()
    monkeypatch.setattr(authors, "wandb", authors_log)
    monkeypatch.setattr(up.train_module, "wandb", adapter_log)
    pipe, config, embeds = _setup(up, seed, clip_range=2e-6)
    adapter = FlowGRPOAdapter(up, RegclipOptions(preset="grpo_guard_official"))
    with adapter:
        sample = _rollout(up, pipe, embeds, config)
    # the means the adapter recorded are the ones the authors' pipeline call returns
    for j in range(STEPS):
        recorded = adapter.store.lookup(sample["next_latents"][:, j], ["mean"])["mean"]
        torch.testing.assert_close(recorded, sample["prev_sample_mean"][:, j], rtol=0, atol=0)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # as after some optimizer steps: drifts differ across the batch
        for p in pipe.transformer.parameters():
            p.add_(3e-3 * torch.randn(p.shape, generator=generator))
    rewards = torch.randn(6, generator=generator) * 3
    sample = smoke.with_advantages(sample, rewards, group=3, steps=STEPS)

    theirs = _run(up, authors, pipe, sample, config, embeds, Accelerator)
    with adapter:
        ours = _run(up, up.train_module, pipe, sample, config, embeds, up.train_module.Accelerator)
    assert adapter.loss_fn is not None and adapter.loss_fn.normalizer.name == "batch_ratio_norm"
    assert any(g.abs().sum() > 0 for g in theirs)
    # float32 arithmetic in a different order: equal to rounding (relative norm error)
    assert rel_error(ours, theirs) < 1e-5
    (their_log,), (our_log,) = authors_log.logs, adapter_log.logs
    # mean(-A rho) with rho = 1 +- 1e-6 and zero-mean A: a float32 ulp of rho times |A| / dt
    # (~1e-6) bounds the agreement of the values, not their size
    assert our_log["regclip/loss"] == pytest.approx(their_log["loss"], rel=0, abs=1e-5)
    assert our_log["regclip/loss/policy"] == pytest.approx(their_log["policy_loss"], abs=1e-5)
    # the authors' clip fraction counts |ratio - 1| > eps; regclip's counts zeroed gradients
    assert 0 < their_log["clipfrac"] < 1
    assert {"regclip/clip/frac", "regclip/step00/clip/frac"} <= set(our_log)

    # regclip's per-sample guard is a different loss: the comparison can fail
    with FlowGRPOAdapter(up, RegclipOptions(preset="grpo_guard")) as per_sample:
        per_sample.store = adapter.store
        other = _run(up, up.train_module, pipe, sample, config, embeds, up.train_module.Accelerator)
    assert rel_error(other, theirs) > 1e-3
