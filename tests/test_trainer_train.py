"""GRPOTrainer on tiny random SD3 / Flux models: LoRA-only updates, exact resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regclip.cli import main as regclip_main
from regclip.trainer import (
    GRPOTrainer,
    TrainConfig,
    build_components,
    colorfulness,
    jpeg_compressibility,
    load_reward,
)


def _trainer(tmp_path: Path, arch: str, **overrides: object) -> GRPOTrainer:
    config = TrainConfig.smoke(arch, output_dir=str(tmp_path), **overrides)
    return GRPOTrainer(config, build_components(config))


def _snapshot(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_training_step_changes_lora_weights_and_nothing_else(tmp_path: Path, arch: str) -> None:
    trainer = _trainer(tmp_path, arch, seed=11)
    before = _snapshot(trainer)
    buffers = {n: b.clone() for n, b in trainer.unwrapped.named_buffers()}
    vae_before = {n: p.clone() for n, p in trainer.vae.state_dict().items()}
    metrics = trainer.train_iteration()
    after = _snapshot(trainer)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    lora_b = {n for n in lora if "lora_B" in n}
    assert changed, "the step changed nothing"
    assert changed <= lora, f"non-LoRA parameters changed: {sorted(changed - lora)[:5]}"
    # SD3's last block is `context_pre_only`: its context queries feed only discarded
    # outputs, so that adapter has no gradient. Every other LoRA B matrix must move.
    last = f"transformer_blocks.{trainer.unwrapped.config.num_layers - 1}.attn.add_q_proj."
    no_gradient = {n for n in lora_b if arch == "sd3" and n.startswith(last)}
    assert lora_b - no_gradient <= changed, f"LoRA B left unchanged: {sorted(lora_b - changed)[:5]}"
    assert all(
        torch.equal(b, dict(trainer.unwrapped.named_buffers())[n]) for n, b in buffers.items()
    )
    assert all(torch.equal(v, trainer.vae.state_dict()[n]) for n, v in vae_before.items())
    assert metrics["optimizer_steps"] == 2  # 2 prompts x 4 samples / batch 4, accumulate 1
    assert set(metrics["timesteps"]) == {"0", "1", "2"}


def test_first_micro_batch_has_ratio_exactly_one(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "sd3", prompts_per_iteration=1)
    rollouts, _ = trainer.rollout()
    for k in range(rollouts[0].num_sde_steps):
        out = trainer.transition_loss(rollouts[0], k)
        assert torch.equal(out.ratio.detach(), torch.ones_like(out.ratio))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_resume_reproduces_the_next_step(tmp_path: Path, arch: str) -> None:
    overrides = {"ema_decay": 0.9, "passes": 2, "seed": int(torch.randint(1 << 20, ()))}
    straight = _trainer(tmp_path / "a", arch, **overrides)
    straight.train_iteration()
    expected_metrics = straight.train_iteration()
    expected = _snapshot(straight)

    first = _trainer(tmp_path / "b", arch, **overrides)
    first.train_iteration()
    checkpoint = first.save_checkpoint()
    assert (checkpoint / "lora").is_dir()

    resumed = _trainer(tmp_path / "b", arch, **overrides)
    resumed.load_checkpoint("latest")
    assert resumed.iteration == 1
    metrics = resumed.train_iteration()
    got = _snapshot(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert metrics["loss"] == expected_metrics["loss"]
    assert metrics["reward/mean"] == expected_metrics["reward/mean"]
    assert resumed.ema is not None and straight.ema is not None
    for a, b in zip(resumed.ema.shadow_params, straight.ema.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_gradients_accumulate_over_batches_and_timesteps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "flux", accumulate_batches=2, vae=None, reward="latent_std")
    metrics = trainer.train_iteration()
    assert metrics["optimizer_steps"] == 1
    assert trainer.accelerator.gradient_accumulation_steps == 2 * 3


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_cli_smoke_runs_and_checkpoints(
    tmp_path: Path, arch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        regclip_main(
            [
                "train",
                "--smoke",
                "--arch",
                arch,
                "--output-dir",
                str(tmp_path),
                "--preset",
                "grpo_guard",
            ]
        )
        == 0
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "clip/frac" in json.loads(lines[0])
    assert (tmp_path / "checkpoints" / "iter_000001" / "trainer_state.pt").is_file()
    assert '"reward/mean"' in capsys.readouterr().out


def test_config_files_json_and_toml_agree(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        'arch = "flux"\ngroup_size = 12\nsde_steps = [0, 1]\npreset = "flow_grpo"\n'
    )
    (tmp_path / "c.json").write_text(
        json.dumps({"arch": "flux", "group_size": 12, "sde_steps": [0, 1], "preset": "flow_grpo"})
    )
    assert TrainConfig.from_file(tmp_path / "c.toml") == TrainConfig.from_file(tmp_path / "c.json")
    assert TrainConfig.from_file(tmp_path / "c.toml").sde_steps == [0, 1]
    (tmp_path / "bad.json").write_text('{"group_sise": 3}')
    with pytest.raises(ValueError, match="group_sise"):
        TrainConfig.from_file(tmp_path / "bad.json")


def test_jpeg_compressibility_prefers_flat_images() -> None:
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand((1, 3, 64, 64), generator=g)
    assert jpeg_compressibility(flat).item() > jpeg_compressibility(noisy).item()
    assert jpeg_compressibility(noisy).item() < 0


@settings(max_examples=25, deadline=None)
@given(gray=st.floats(0, 1), red=st.floats(0.2, 1))
def test_colorfulness_is_zero_for_gray_and_positive_for_colour(gray: float, red: float) -> None:
    assert colorfulness(torch.full((1, 3, 4, 4), gray)).item() == pytest.approx(0, abs=1e-4)
    colour = torch.zeros(1, 3, 4, 4)
    colour[:, 0] = red
    assert colorfulness(colour).item() > 0


def test_rewards_load_by_name_or_import_path() -> None:
    assert load_reward("colorfulness") is colorfulness
    assert load_reward("regclip.trainer.rewards:jpeg_compressibility") is jpeg_compressibility
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("pickscore")


def test_kl_to_the_adapter_free_base_starts_at_zero(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path, "flux", kl_coef=0.1, prompts_per_iteration=1, vae="none", reward="latent_std"
    )
    rollouts, _ = trainer.rollout()
    out = trainer.transition_loss(rollouts[0], 0)
    assert out.metrics["loss/kl"] == 0.0  # LoRA B starts at zero: policy == base
    with torch.no_grad():  # move the adapter: the KL must see it
        for name, param in trainer.unwrapped.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)
    assert trainer.transition_loss(rollouts[0], 0).metrics["loss/kl"] > 0


@pytest.mark.parametrize(
    ("sde", "preset"), [("dance", "grpo_guard"), ("cps", "velocity_guard"), ("flow", "ratio_norm")]
)
def test_every_kernel_and_preset_trains_with_ratio_one_on_the_first_batch(
    tmp_path: Path, sde: str, preset: str
) -> None:
    trainer = _trainer(tmp_path, "flux", sde=sde, preset=preset, vae="none", reward="latent_std")
    rollouts, _ = trainer.rollout()
    out = trainer.transition_loss(rollouts[0], 2)
    assert torch.equal(out.ratio.detach(), torch.ones_like(out.ratio))
    assert torch.isfinite(torch.tensor(trainer.update(rollouts)["loss"]))


def test_two_process_ddp_smoke_splits_the_samples(tmp_path: Path) -> None:
    """``torchrun`` with 2 CPU ranks (gloo): each rank trains on half the samples."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "regclip.cli", "train", "--smoke", "--arch", "flux", "--output-dir", str(tmp_path),
           "--batch-size", "2", "--vae", "none", "--reward", "latent_std"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text())
    # 2 prompts x 4 samples over 2 ranks = 4 per rank = 2 batches of 2: 2 optimizer steps
    assert metrics["optimizer_steps"] == 2


def test_full_finetune_trains_the_transformer_without_adapters(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "flux", full_finetune=True, vae="none", reward="latent_std")
    before = _snapshot(trainer)
    assert not any("lora_" in n for n in before)
    trainer.train_iteration()
    after = _snapshot(trainer)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > len(before) // 2
    assert not (tmp_path / "lora").exists()
    path = trainer.save_checkpoint()
    assert not (path / "lora").exists() and (path / "trainer_state.pt").is_file()


class _FakePipeline:
    """Stands in for a pipeline with text encoders: embeddings encode the prompt length."""

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: object) -> _FakePipeline:
        assert kwargs["transformer"] is None and kwargs["vae"] is None
        return cls()

    def to(self, device: str) -> _FakePipeline:
        return self

    @staticmethod
    def _embed(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([float(len(p)) for p in prompts])
        return lengths.view(-1, 1, 1).expand(-1, 3, 8).clone(), lengths.view(-1, 1).expand(
            -1, 4
        ).clone()

    def encode_prompt(self, prompt: list[str], *args: object, **kwargs: object) -> tuple:
        pe, pp = self._embed(prompt)
        if "do_classifier_free_guidance" in kwargs:  # SD3 signature
            neg = kwargs["negative_prompt"]
            npe, npp = self._embed([neg] * len(prompt)) if neg is not None else (None, None)
            return pe, npe, pp, npp
        return pe, pp, torch.zeros(3, 3)  # Flux: (prompt_embeds, pooled, text_ids)


@pytest.mark.parametrize("arch_name", ["sd3", "flux"])
def test_encode_prompts_batches_and_stores_negatives(
    tmp_path: Path, arch_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    from regclip.trainer import PromptSet, encode_prompts, get_architecture

    for name in ("StableDiffusion3Pipeline", "FluxPipeline"):
        monkeypatch.setattr(diffusers, name, _FakePipeline)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    encoded = encode_prompts(get_architecture(arch_name), "/models/x", prompts, device="cpu",
                             batch_size=2)  # fmt: skip
    assert encoded.texts == tuple(prompts)
    assert encoded.embeds.prompt_embeds[:, 0, 0].tolist() == [1, 2, 3, 4, 5]
    assert encoded.embeds.has_negative
    assert torch.all(encoded.embeds.negative_pooled == 0)  # the empty negative prompt
    encoded.save(tmp_path / "e.pt")
    loaded = PromptSet.load(tmp_path / "e.pt")
    assert loaded.texts == encoded.texts
    assert torch.equal(loaded.embeds.prompt_embeds, encoded.embeds.prompt_embeds)


def test_update_reads_metrics_once_not_per_micro_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update never reads ``LossOutput.metrics`` (a device sync per call) and feeds the
    per-timestep diagnostics only after its last optimizer step."""
    from regclip.output import LossOutput

    def no_sync(self: LossOutput) -> dict[str, float]:
        raise AssertionError("LossOutput.metrics read inside the update loop")

    monkeypatch.setattr(LossOutput, "metrics", property(no_sync))
    trainer = _trainer(tmp_path, "sd3", passes=2)
    rollouts, _ = trainer.rollout()
    events: list[str] = []
    step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda: (events.append("step"), step())[1])
    update = trainer.diagnostics.update
    monkeypatch.setattr(
        trainer.diagnostics, "update", lambda *a: (events.append("diag"), update(*a))[1]
    )
    metrics = trainer.update(rollouts)
    calls = 2 * len(rollouts) * rollouts[0].num_sde_steps
    assert events == ["step"] * calls + ["diag"] * calls
    assert {"loss", "clip/frac", "grad_norm", "optimizer_steps"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
