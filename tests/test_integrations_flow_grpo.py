"""Flow-GRPO adapter against the real upstream code (``pytest -m upstream`` with
``REGCLIP_FLOW_GRPO_SRC`` set to a flow_grpo checkout; commit in FLOW_GRPO_COMMIT)."""

from __future__ import annotations

import pytest
import torch
from integrations.common import IncompatibleUpstreamError, RegclipOptions
from integrations.standins import install_standins

from _upstream import NoStep, skip_on_missing_dependency, take_grads, upstream_checkout

SRC, pytestmark = upstream_checkout("REGCLIP_FLOW_GRPO_SRC", "flow_grpo checkout")


@pytest.fixture(scope="module")
def up():
    install_standins(["absl", "ml_collections", "wandb"])
    from integrations.flow_grpo.adapter import load_upstream

    with skip_on_missing_dependency(SRC):
        return load_upstream(SRC)


@pytest.fixture()
def logger(up, monkeypatch):
    from integrations.flow_grpo.smoke import RecordingLogger

    recorder = RecordingLogger()
    monkeypatch.setattr(up.train_module, "wandb", recorder)
    return recorder


def _setup(up, seed, batch=4, num_steps=4):
    from integrations.flow_grpo import smoke

    pipe = smoke.build_pipeline("tiny", seed=seed)
    config = smoke.make_config(sample__num_steps=num_steps)
    generator = torch.Generator().manual_seed(seed)
    embeds = smoke.random_embeddings(pipe, batch, 8, generator)
    return pipe, config, embeds


def test_rollout_records_the_means_upstreams_step_returns(up):
    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter

    from regclip import gaussian_log_prob

    pipe, config, embeds = _setup(up, seed=1)
    adapter = FlowGRPOAdapter(up)
    with adapter, torch.no_grad():
        _, sample = smoke.rollout(up, pipe, embeds, config, resolution=16)
    assert len(adapter.store) == 4 * config.sample.num_steps
    assert up.train_module.compute_log_prob is adapter._originals["compute_log_prob"]
    cond = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        for j in range(config.sample.num_steps):
            # upstream's own training-time evaluation of rollout transition j
            _, log_prob, mean, std_dev_t = up.train_module.compute_log_prob(
                pipe.transformer, pipe, sample, j, cond, pooled, config
            )
            recorded = adapter.store.lookup(sample["next_latents"][:, j], ["mean"])["mean"]
            torch.testing.assert_close(recorded, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(log_prob, sample["log_probs"][:, j], rtol=1e-5, atol=1e-5)
            # the recorded mean explains the rollout's log-prob of its own draw
            s = std_dev_t.flatten() * torch.sqrt(sigmas[j] - sigmas[j + 1])
            torch.testing.assert_close(
                gaussian_log_prob(sample["next_latents"][:, j], recorded, s),
                sample["log_probs"][:, j],
                rtol=1e-5,
                atol=1e-5,
            )


def _perturb(module, seed, scale=2e-3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def test_vanilla_preset_reproduces_upstream_loss_and_gradient(up, logger):
    from accelerate import Accelerator
    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter

    pipe, config, embeds = _setup(up, seed=2)
    adapter = FlowGRPOAdapter(up, RegclipOptions(preset="flow_grpo"))
    with adapter, torch.no_grad():
        _, sample = smoke.rollout(up, pipe, embeds, config, resolution=16)
    _perturb(pipe.transformer, seed=3)  # as after an optimizer step: ratios differ from 1
    rewards = torch.randn(4, generator=torch.Generator().manual_seed(4))
    sample = smoke.with_advantages(sample, rewards * 3, group=2, steps=config.sample.num_steps)
    sample = {k: v[torch.tensor([2, 0, 3, 1])] for k, v in sample.items()}
    steps = config.sample.num_steps

    smoke.run_timestep_loop(
        up, pipe, sample, config, Accelerator(gradient_accumulation_steps=steps), NoStep(), embeds
    )
    upstream_grads = take_grads(pipe.transformer)
    with adapter:
        accelerator = up.train_module.Accelerator(gradient_accumulation_steps=steps)
        smoke.run_timestep_loop(up, pipe, sample, config, accelerator, NoStep(), embeds)
    adapter_grads = take_grads(pipe.transformer)

    upstream_log, adapter_log = logger.logs
    assert 0 < upstream_log["clipfrac"] < 1  # some samples clipped, some not
    assert adapter_log["loss"] == upstream_log["loss"]  # upstream's own keys unchanged
    assert adapter_log["regclip/loss"] == pytest.approx(upstream_log["loss"], rel=1e-6, abs=0)
    for a, b in zip(adapter_grads, upstream_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in upstream_grads)


class _Prepared(torch.nn.Module):
    """What ``accelerator.prepare`` returns on several GPUs: the model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_vanilla_preset_reproduces_upstreams_kl_term(up, logger):
    from accelerate import Accelerator
    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter
    from peft import LoraConfig, get_peft_model

    pipe, _, embeds = _setup(up, seed=7)
    config = smoke.make_config(train__beta=0.04)
    pipe.transformer.requires_grad_(False)
    lora = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k"]
    )
    pipe.transformer = get_peft_model(pipe.transformer, lora)
    prepared = _Prepared(pipe.transformer)
    adapter = FlowGRPOAdapter(up, RegclipOptions(preset="flow_grpo"))
    with adapter, torch.no_grad():
        _, sample = smoke.rollout(up, pipe, embeds, config, resolution=16)
    lora_params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    _perturb(torch.nn.ParameterList(lora_params), seed=8, scale=0.05)
    rewards = torch.randn(4, generator=torch.Generator().manual_seed(9))
    sample = smoke.with_advantages(sample, rewards, group=2, steps=config.sample.num_steps)
    steps = config.sample.num_steps

    smoke.run_timestep_loop(
        up,
        pipe,
        sample,
        config,
        Accelerator(gradient_accumulation_steps=steps),
        NoStep(),
        embeds,
        transformer=prepared,
    )
    upstream_grads = take_grads(torch.nn.ParameterList(lora_params))
    with adapter:
        accelerator = up.train_module.Accelerator(gradient_accumulation_steps=steps)
        smoke.run_timestep_loop(
            up, pipe, sample, config, accelerator, NoStep(), embeds, transformer=prepared
        )
    adapter_grads = take_grads(torch.nn.ParameterList(lora_params))

    upstream_log, adapter_log = logger.logs
    assert upstream_log["kl_loss"] > 0
    assert adapter_log["regclip/loss/kl"] == pytest.approx(upstream_log["kl_loss"], rel=1e-5)
    assert adapter_log["regclip/loss"] == pytest.approx(upstream_log["loss"], rel=1e-5)
    for a, b in zip(adapter_grads, upstream_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


def test_grpo_guard_runs_a_full_rollout_and_update(up, logger):
    from accelerate import Accelerator
    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter

    pipe, config, _ = _setup(up, seed=5)
    before = [p.detach().clone() for p in pipe.transformer.parameters()]
    optimizer = torch.optim.AdamW(pipe.transformer.parameters(), lr=1e-3)
    with FlowGRPOAdapter(up, RegclipOptions(preset="grpo_guard")) as adapter:
        base = up.train_module.Accelerator
        assert issubclass(base, Accelerator) and base is not Accelerator
        for _ in range(2):  # second epoch: the store is refilled by the new rollout
            stats = smoke.run_epoch(
                up,
                pipe,
                config,
                batch=4,
                group=2,
                resolution=16,
                seq=8,
                inner_epochs=1,
                optimizer=optimizer,
                accelerator_cls=base,
                reward=lambda images: images.float().mean(dim=(1, 2, 3)),
                generator=torch.Generator().manual_seed(6),
            )
            assert stats["optimizer_steps"] == 1
            assert len(adapter.store) == 4 * config.sample.num_steps
        assert adapter.loss_fn is not None and adapter.loss_fn.normalizer.name == "ratio_norm"
    moved = [
        not torch.equal(a, b.detach())
        for a, b in zip(before, pipe.transformer.parameters(), strict=True)
    ]
    assert any(moved)
    for log in logger.logs:
        assert {
            "regclip/loss",
            "regclip/clip/frac",
            "regclip/step00/ratio/mean",
            "clipfrac",
        } <= set(log)
        assert all(torch.isfinite(torch.tensor(v)) for v in log.values())


def test_incompatible_upstream_fails_with_the_commit_in_the_message(up, monkeypatch):
    from integrations.flow_grpo.adapter import check_compatible

    def new_step(
        self,
        model_output,
        timestep,
        sample,
        noise_level=0.7,
        prev_sample=None,
        generator=None,
        sde_type="sde",
    ):
        return prev_sample

    monkeypatch.setattr(up.sde_module, "sde_step_with_logprob", new_step)
    assert up.commit is not None  # a supported checkout, recognized by its script's contents
    with pytest.raises(IncompatibleUpstreamError, match=up.commit[:7]):
        check_compatible(up)


def test_a_training_batch_reads_the_device_once_whatever_its_step_count(up, logger, monkeypatch):
    """The loss's inputs for every step of a batch (t, dt, store keys) come to the host in
    one go on its first step; the loss checks values until the first logged optimizer step
    (``--regclip_validate first``), then not."""
    import sys

    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter

    steps = 4
    pipe, config, embeds = _setup(up, seed=5, num_steps=steps)
    adapter = FlowGRPOAdapter(up)
    with adapter, torch.no_grad():
        _, sample = smoke.rollout(up, pipe, embeds, config, resolution=16)
    rewards = torch.randn(4, generator=torch.Generator().manual_seed(6))
    sample = smoke.with_advantages(sample, rewards, group=2, steps=steps)
    reads: list[str] = []
    host_copy = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        caller = sys._getframe(1).f_code
        if "/integrations/" in caller.co_filename:
            reads.append(caller.co_name)
        return host_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    validated: list[bool] = []
    checks = adapter.validated

    def recording(loss_fn, step):
        validated.append(checks(loss_fn, step).validate)
        return loss_fn

    monkeypatch.setattr(adapter, "validated", recording)
    built = []  # the loss (and its kernel) is looked up once per batch, not per call
    build = adapter._loss_fn
    monkeypatch.setattr(adapter, "_loss_fn", lambda *a: built.append(1) or build(*a))
    for _ in range(2):  # two optimizer steps over the same batch
        with adapter:
            accelerator = up.train_module.Accelerator(gradient_accumulation_steps=steps)
            smoke.run_timestep_loop(up, pipe, sample, config, accelerator, NoStep(), embeds)
    # the schedule and timesteps, the draws' keys, the recorded keys: once for 8 loss calls
    assert sorted(reads) == ["_batch_schedule", "_batch_schedule", "_settle", "heads"]
    assert validated == [True] * steps + [False] * steps and len(built) == 1
    assert adapter.loss_fn is not None and adapter.loss_fn.validate is False
    reads.clear()
    with adapter:  # a new batch (new tensors, as upstream's shuffle makes): read again
        accelerator = up.train_module.Accelerator(gradient_accumulation_steps=steps)
        shuffled = {k: v[torch.tensor([1, 0, 3, 2])] for k, v in sample.items()}
        smoke.run_timestep_loop(up, pipe, shuffled, config, accelerator, NoStep(), embeds)
    assert sorted(reads) == ["_batch_schedule", "_batch_schedule", "heads"] and len(built) == 2
    always = FlowGRPOAdapter(up, RegclipOptions(validate="always"))
    assert [always.validated(adapter.loss_fn, 0).validate for _ in range(2)] == [True, True]
