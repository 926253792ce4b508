"""DanceGRPO adapter against the real upstream code (the tests marked ``upstream``: run them
with ``pytest -m upstream`` and ``REGCLIP_DANCEGRPO_SRC`` set to a DanceGRPO checkout;
commit in DANCEGRPO_COMMIT), and the adapter's own pieces (no checkout needed).

``fastvideo.train_grpo_flux`` imports wandb, cv2, liger-kernel, flash-attn, decord and
torchvision at module level; missing ones get stand-ins (``integrations.standins``)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
from integrations.common import IncompatibleUpstreamError, RegclipOptions
from integrations.standins import install_standins

from _upstream import skip_on_missing_dependency, upstream_checkout

SRC, UPSTREAM = upstream_checkout("REGCLIP_DANCEGRPO_SRC", "DanceGRPO checkout")
_Test = TypeVar("_Test", bound=Callable[..., Any])


def upstream(test: _Test) -> _Test:
    """Marks a test that runs the real DanceGRPO code: ``pytest -m upstream`` selects it,
    and it skips without a checkout."""
    for mark in UPSTREAM:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def up():
    from integrations.dance_grpo.smoke import STANDINS

    install_standins(STANDINS)
    from integrations.dance_grpo.adapter import load_upstream

    with skip_on_missing_dependency(SRC):
        return load_upstream(SRC)


@upstream
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


def _run(up, preset, seed=0, steps=1, options=None, args=None, watch=None):
    """``steps`` of upstream's ``train_one_step`` on a tiny model; ``watch(adapter)`` runs
    before the adapter is installed."""
    from integrations.dance_grpo import smoke
    from integrations.dance_grpo.adapter import DanceGRPOAdapter

    transformer, vae = smoke.build_models("tiny", seed=seed)
    wrapped = smoke.FSDPStandIn(transformer)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1.0)
    args = args or smoke.make_args()
    loader = smoke.prompt_loader(transformer, seq=8, seed=seed)
    adapter = DanceGRPOAdapter(up, options or RegclipOptions(preset=preset)) if preset else None
    losses = []
    if adapter:
        if watch:
            watch(adapter)
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


@upstream
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


@upstream
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


@upstream
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


@upstream
def test_incompatible_upstream_fails_with_the_commit_in_the_message(up, monkeypatch):
    from integrations.dance_grpo.adapter import DANCEGRPO_COMMIT, check_compatible

    check_compatible(up)
    monkeypatch.setattr(up.train_module, "grpo_one_step", lambda args, latents: None)
    with pytest.raises(IncompatibleUpstreamError, match=DANCEGRPO_COMMIT[:7]):
        check_compatible(up)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class DeviceReads:
    """Counts the host reads (:data:`HOST_READS`) that ``integrations/`` code makes of
    tensors a CUDA run keeps on the device, as ``(call, function, method)``: ``call``
    numbers the ``grpo_one_step`` calls from 1 (0: before the first). On this CPU run a
    tensor counts as on the device unless it is a host one of a CUDA run: upstream's sigma
    schedule (made by ``torch.linspace`` on the host, never moved), a ``.cpu()`` copy
    (here a new tensor, as a GPU's would be) or a view of one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[int, str, str]] = []
        self.call = 0
        self._host: list[torch.Tensor] = []  # kept alive, so their ids stay theirs
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name))

    def _on_host(self, tensor: torch.Tensor) -> bool:
        ids = {id(t) for t in self._host}
        return id(tensor) in ids or (tensor._base is not None and id(tensor._base) in ids)

    def _counting(self, name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            if "/integrations/" in caller.co_filename and not self._on_host(tensor):
                self.reads.append((self.call, caller.co_name, name))
            out = original(tensor, *args, **kwargs)
            if name == "cpu":
                out = out.clone() if out is tensor else out
                self._host.append(out)
            return out

        return read

    def watch(self, adapter: Any) -> None:
        """Number ``adapter``'s training calls and learn the rollout's sigma schedule."""
        sample, train = adapter._run_sample_step, adapter._grpo_one_step

        def run_sample_step(args, z, progress_bar, sigma_schedule, *rest):
            self._host.append(sigma_schedule)
            return sample(args, z, progress_bar, sigma_schedule, *rest)

        def grpo_one_step(*args):
            self.call += 1
            return train(*args)

        adapter._run_sample_step, adapter._grpo_one_step = run_sample_step, grpo_one_step


def test_a_call_slice_is_found_in_its_batch_tensor_or_refused():
    from integrations.dance_grpo.adapter import _BatchCopy, _rows_of_base

    g = torch.Generator().manual_seed(3)
    samples = torch.randn(4, 3, 5, 6, generator=g)  # (batch, steps, tokens, channels)
    perms = torch.stack([torch.randperm(3, generator=g) for _ in range(4)])
    batched = samples.unsqueeze(1)  # upstream's slicing: a sample of it, then [:, _]
    for k, sample in enumerate(batched):
        for j in range(3):
            base, shape, start = _rows_of_base(sample[:, j])
            assert base is samples and shape == (5, 6) and start == 3 * k + j
            assert _rows_of_base(perms[k][j])[1:] == ((), 3 * k + j)
    for run in (samples[1, 1:3], samples.reshape(-1)[12:36].view(2, 2, 6)):  # runs of rows
        base, shape, start = _rows_of_base(run)
        assert torch.equal(base.reshape(-1, *shape)[start : start + len(run)], run)
    for refused in (
        samples,  # not a view
        samples[:, 1],  # rows not adjacent: not contiguous
        samples[0, 0, :, :2],  # not contiguous
        samples.reshape(-1)[2:14].view(2, 6),  # starts inside a row
    ):
        assert _rows_of_base(refused) is None
    reads: list[torch.Tensor] = []

    def read(rows: torch.Tensor) -> torch.Tensor:
        reads.append(rows)
        return rows.clone()

    copy = _BatchCopy(read)
    assert torch.equal(copy(batched[2][:, 1]), samples[2, 1][None])
    assert torch.equal(copy(batched[3][:, 0]), samples[3, 0][None])
    assert len(reads) == 1 and reads[0].shape == (12, 5, 6)
    shuffled = samples[torch.tensor([1, 0, 3, 2])]  # a new batch: read again
    assert torch.equal(copy(shuffled[1:2, 0]), samples[0, 0][None]) and len(reads) == 2
    assert copy(samples[:, 1]) is None and len(reads) == 2
    shuffled.mul_(10)  # written in place: read again
    assert torch.equal(copy(shuffled[1:2, 0]), 10 * samples[0, 0][None]) and len(reads) == 3
    flat_rows = shuffled.reshape(-1)[60:90].view(5, 6)  # same base, rows of another shape
    assert torch.equal(copy(flat_rows), shuffled[0, 2]) and len(reads) == 4


@upstream
def test_a_training_batch_reads_the_device_three_times_whatever_its_call_count(up, monkeypatch):
    """On a batch's first loss call the adapter reads the keys of the batch's draws, its
    sigma indices and the keys recorded by the rollout, one transfer each; no other call
    reads anything. (Upstream's own loop still reads on every call, ``total_loss +=
    avg_loss.item()``: not counted here.)"""
    from integrations.dance_grpo import smoke

    args = smoke.make_args(timestep_fraction=1.0)  # 4 rows x 3 steps = 12 calls a batch
    reads = DeviceReads(monkeypatch)
    _, _, adapter, _ = _run(up, "grpo_guard", seed=4, steps=2, args=args, watch=reads.watch)
    first_calls = {1, 13}
    assert reads.call == 24
    assert Counter(reads.reads) == Counter(
        (call, function, "cpu")
        for call in first_calls
        for function in ("heads", "_to_host", "_settle")
    )
    assert adapter.loss_fn.validate is False  # each step's first call checked values


@upstream
def test_batch_reads_give_the_losses_and_gradients_of_per_call_reads(up, monkeypatch):
    """The keys and indices read once per batch are those each call read for itself
    before: same upstream losses, same parameters, same metrics; inputs that are not
    slices of a batch tensor still work, at two reads a call."""
    from integrations.dance_grpo import adapter as module
    from integrations.dance_grpo import smoke

    args = smoke.make_args(timestep_fraction=1.0)
    runs = {}
    for per_call in (False, True):
        with monkeypatch.context() as patch:
            if per_call:  # the inputs as if upstream had copied them: no batch tensor
                patch.setattr(module, "_rows_of_base", lambda view: None)
            reads = DeviceReads(patch)
            model, losses, adapter, _ = _run(
                up, "grpo_guard", seed=5, steps=2, args=args, watch=reads.watch
            )
        runs[per_call] = (model, losses, adapter.metrics.flush(), reads.reads)
    model, losses, metrics, reads = runs[False]
    model_each, losses_each, metrics_each, reads_each = runs[True]
    assert losses == losses_each and metrics == metrics_each
    for a, b in zip(model.parameters(), model_each.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(reads) == 6  # 2 batches of 12 calls
    per_call_reads = Counter((function, method) for _, function, method in reads_each)
    assert per_call_reads == {("heads", "cpu"): 24, ("_grpo_one_step", "__int__"): 24,
                              ("_settle", "cpu"): 2}  # fmt: skip
