"""DanceGRPO adapter against the real upstream code (``pytest -m upstream`` with
``REGCLIP_DANCEGRPO_SRC`` set to a DanceGRPO checkout; commit in DANCEGRPO_COMMIT).

``fastvideo.train_grpo_flux`` imports wandb, cv2, liger-kernel, flash-attn, decord and
torchvision at module level; missing ones get stand-ins (``integrations.standins``)."""

from __future__ import annotations

import pytest
import torch
from integrations.common import IncompatibleUpstreamError, RegclipOptions
from integrations.standins import install_standins

from _upstream import skip_on_missing_dependency, upstream_checkout

SRC, pytestmark = upstream_checkout("REGCLIP_DANCEGRPO_SRC", "DanceGRPO checkout")


@pytest.fixture(scope="module")
def up():
    from integrations.dance_grpo.smoke import STANDINS

    install_standins(STANDINS)
    from integrations.dance_grpo.adapter import load_upstream

    with skip_on_missing_dependency(SRC):
        return load_upstream(SRC)


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_dance_sde_kernel_is_upstreams_flux_step(up, eta):
    from regclip import DanceSDE, gaussian_log_prob

    m = up.train_module
    sigmas = m.sd3_time_shift(3.0, torch.linspace(1, 0, 9))
    generator = torch.Generator().manual_seed(int(eta * 10))
    kernel = DanceSDE(eta)
    for index in range(8):
        latents = torch.randn(2, 16, 64, generator=generator)
        velocity = torch.randn(2, 16, 64, generator=generator)
        t, dt = float(sigmas[index]), float(sigmas[index + 1] - sigmas[index])
        mean, std = kernel.evaluate(latents, velocity, t, dt)
        upstream_mean, _ = m.flux_step(velocity, latents, eta, sigmas, index, None, False, True)
        torch.testing.assert_close(mean, upstream_mean, rtol=1e-5, atol=1e-6)
        torch.manual_seed(index)
        draw, _, log_prob = m.flux_step(velocity, latents, eta, sigmas, index, None, True, True)
        torch.manual_seed(index)
        torch.testing.assert_close(draw, mean + std[:, None, None] * torch.randn_like(mean))
        torch.testing.assert_close(
            gaussian_log_prob(draw, mean, std), log_prob, rtol=1e-5, atol=1e-5
        )
        _, _, scored = m.flux_step(velocity, latents, eta, sigmas, index, draw, True, True)
        torch.testing.assert_close(scored, log_prob)


def _run(up, preset, seed=0, steps=1, options=None):
    from integrations.dance_grpo import smoke
    from integrations.dance_grpo.adapter import DanceGRPOAdapter

    transformer, vae = smoke.build_models("tiny", seed=seed)
    wrapped = smoke.FSDPStandIn(transformer)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1.0)
    args = smoke.make_args()
    loader = smoke.prompt_loader(transformer, seq=8, seed=seed)
    adapter = DanceGRPOAdapter(up, options or RegclipOptions(preset=preset)) if preset else None
    losses = []
    if adapter:
        adapter.install()
    try:
        for step in range(steps):
            torch.manual_seed(100 * seed + step)
            loss, _ = smoke.train_step(
                up, args, wrapped, vae, optimizer, loader, torch.device("cpu"), max_grad_norm=1e9
            )
            losses.append(loss)
    finally:
        if adapter:
            adapter.uninstall()
    return transformer, losses, adapter, args


def test_vanilla_preset_reproduces_upstreams_update(up):
    from integrations.dance_grpo import smoke
    from integrations.dance_grpo.adapter import train_timesteps

    reference, upstream_losses, _, _ = _run(up, None, seed=1)
    adapted, adapter_losses, adapter, args = _run(up, "dance_grpo", seed=1)
    assert adapter_losses == upstream_losses  # upstream's printed loss is unchanged
    initial, _ = smoke.build_models("tiny", seed=1)
    moved = 0.0
    for a, b, c in zip(
        adapted.parameters(), reference.parameters(), initial.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        moved += float((b - c).abs().sum())
    assert moved > 0
    metrics = adapter.metrics.flush()
    calls = args.num_generations * train_timesteps(args)
    scale = 1 / (args.gradient_accumulation_steps * train_timesteps(args))
    assert metrics["regclip/loss"] * calls * scale == pytest.approx(
        upstream_losses[0], rel=1e-5, abs=1e-9
    )


def test_grpo_guard_runs_full_rollout_and_update_steps(up):
    from integrations.dance_grpo import smoke

    initial, _ = smoke.build_models("tiny", seed=2)
    trained, _, adapter, args = _run(up, "grpo_guard", seed=2, steps=2)
    assert len(adapter.store) == args.num_generations * args.sampling_steps
    assert adapter.loss_fn.normalizer.name == "ratio_norm"
    assert type(adapter.loss_fn.reweighter).__name__ == "EqualizingWeight"
    assert any(
        not torch.equal(a, b)
        for a, b in zip(trained.parameters(), initial.parameters(), strict=True)
    )
    metrics = adapter.metrics.flush()
    assert {"regclip/loss", "regclip/clip/frac", "regclip/log_ratio/std"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_logger_proxy_adds_metrics_to_upstreams_train_log(up, monkeypatch):
    from integrations.dance_grpo.adapter import DanceGRPOAdapter

    import regclip

    logs = []
    recorder = type("Recorder", (), {"log": staticmethod(lambda d, step=None: logs.append(d))})
    monkeypatch.setattr(up.train_module, "wandb", recorder)
    loss = regclip.presets.grpo_guard(sde="dance")
    x = torch.randn(4, 8)
    out = loss(
        advantages=torch.randn(4),
        mean=x + 1e-3,
        old_mean=x,
        next_sample=x + 0.1 * torch.randn(4, 8),
        std=torch.full((4,), 0.1),
        dt=torch.full((4,), -0.1),
        t=torch.full((4,), 0.5),
    )
    with DanceGRPOAdapter(up) as adapter:
        adapter.metrics.add(out, 3)
        up.train_module.wandb.log({"learning_rate": 1.0})
        up.train_module.wandb.log({"train_loss": 0.5}, step=1)
    assert "regclip/loss" not in logs[0]
    assert logs[1]["train_loss"] == 0.5 and "regclip/step03/ratio/mean" in logs[1]
    assert up.train_module.wandb is recorder  # uninstalled


def test_incompatible_upstream_fails_with_the_commit_in_the_message(up, monkeypatch):
    from integrations.dance_grpo.adapter import DANCEGRPO_COMMIT, check_compatible

    check_compatible(up)
    monkeypatch.setattr(up.train_module, "grpo_one_step", lambda args, latents: None)
    with pytest.raises(IncompatibleUpstreamError, match=DANCEGRPO_COMMIT[:7]):
        check_compatible(up)
