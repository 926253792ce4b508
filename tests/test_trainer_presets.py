"""``regclip train`` builds every preset, adaptive_guard and kl_mask included, through
``LossConfig``; the adaptive controller steps with the optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regclip import AdaptiveClip, KLMask
from regclip.trainer import GRPOTrainer, TrainConfig, build_components


@pytest.mark.parametrize("preset", ["adaptive_guard", "kl_mask"])
def test_adaptive_guard_and_kl_mask_train(tmp_path: Path, preset: str) -> None:
    config = TrainConfig.smoke(
        "flux", output_dir=str(tmp_path), preset=preset, vae="none", reward="latent_std"
    )
    trainer = GRPOTrainer(config, build_components(config))
    surrogate = trainer.loss_fn.surrogate
    assert isinstance(surrogate, AdaptiveClip if preset == "adaptive_guard" else KLMask)
    rollouts, _ = trainer.rollout()
    metrics = trainer.update(rollouts)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    if isinstance(surrogate, AdaptiveClip):  # the schedule is the sampler's, and it stepped
        torch.testing.assert_close(surrogate.times, trainer.sigmas[:-1].double())
        assert int(surrogate.num_steps) > 0


def test_a_resumed_adaptive_guard_run_keeps_its_clip_ranges(tmp_path: Path) -> None:
    config = TrainConfig.smoke(
        "flux", output_dir=str(tmp_path), preset="adaptive_guard", vae="none", reward="latent_std"
    )
    trainer = GRPOTrainer(config, build_components(config))
    rollouts, _ = trainer.rollout()
    trainer.update(rollouts)
    surrogate = trainer.loss_fn.surrogate
    assert isinstance(surrogate, AdaptiveClip)
    ranges = surrogate.ranges.clone()
    assert not torch.equal(ranges, torch.full_like(ranges, float(ranges[0])))  # it moved
    folder = trainer.save_checkpoint()
    fresh = GRPOTrainer(config, build_components(config))
    fresh.load_checkpoint(folder)
    restored = fresh.loss_fn.surrogate
    assert isinstance(restored, AdaptiveClip)
    torch.testing.assert_close(restored.ranges, ranges, rtol=0, atol=0)
    assert int(restored.num_steps) == int(surrogate.num_steps)
