"""CI-safe tests of the adapters' shared machinery (no upstream checkout needed)."""

from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from integrations.common import (
    IncompatibleUpstreamError,
    LoggerProxy,
    MetricLog,
    Patches,
    RegclipOptions,
    SeenTensor,
    StopTraining,
    TransitionStore,
    UpstreamAdapter,
    build_loss,
    inject_gradient,
    launch,
    parse_known_options,
    require_parameters,
    require_source,
    run_main_block,
)
from integrations.dance_grpo.adapter import dance_advantages, train_timesteps

import regclip


def test_regclip_flags_are_split_from_upstreams():
    argv = [
        "--config",
        "config/grpo.py:pickscore_sd3",
        "--regclip_preset=ratio_norm",
        "--config.train.beta=0",
        "--regclip_clip_range",
        "3e-6",
        "--regclip_adv_clip",
        "none",
    ]
    options, rest = parse_known_options(argv)
    assert rest == ["--config", "config/grpo.py:pickscore_sd3", "--config.train.beta=0"]
    assert options == RegclipOptions(preset="ratio_norm", clip_range=3e-6, adv_clip=None)
    assert parse_known_options([])[0] == RegclipOptions()


def _one_line_exit(call, capsys) -> str:
    """Run ``call()``; assert exit status 2 with one line on stderr and return it."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert ": error: " in lines[0]
    return lines[0]


def test_unknown_preset_is_refused_with_the_choices(capsys):
    line = _one_line_exit(lambda: parse_known_options(["--regclip_preset", "guard"]), capsys)
    assert "--regclip_preset" in line and "grpo_guard" in line


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["--regclip_clip_range", "abc"], ["--regclip_clip_range", "a positive number", "'abc'"]),
     (["--regclip_clip_range", "-1"], ["--regclip_clip_range", "'-1'"]),
     (["--regclip_adv_clip", "nan"], ["--regclip_adv_clip", "'nan'"]),
     (["--regclip_max_steps", "x"], ["--regclip_max_steps", "an integer >= 0"]),
     (["--regclip_fused", "maybe"], ["--regclip_fused", "true/false"]),
     (["--regclip_means_device", "gpu"], ["--regclip_means_device", "'same'"])],
)  # fmt: skip
def test_bad_option_values_are_one_readable_line(argv, words, capsys):
    line = _one_line_exit(lambda: parse_known_options(argv), capsys)
    assert all(word in line for word in words), line
    assert "_parse" not in line  # no parser function names


def test_option_help_is_each_fields_docstring_in_plain_text():
    import argparse

    from integrations.common import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest.startswith("regclip_")}
    assert set(helps) == {f"regclip_{name}" for name in RegclipOptions.__dataclass_fields__}
    assert all(text and "``" not in text and ":data:" not in text for text in helps.values())


def test_vanilla_preset_keeps_upstreams_clip_range_and_log_prob_route():
    kernel = regclip.FlowSDE(0.7, sigma_max=0.95)
    loss = build_loss(
        RegclipOptions(preset="flow_grpo"),
        sde="flow",
        kernel=kernel,
        upstream_clip_range=3e-4,
        upstream_adv_clip=4.0,
        kl_coef=0.04,
    )
    assert (loss.surrogate.low, loss.surrogate.high) == (3e-4, 3e-4)
    assert loss.adv_clip == 4.0 and loss.normalizer.source == "log_prob"
    assert loss.kl is not None and loss.kl.coef == 0.04 and loss.kl.variance == "sigma"


@pytest.mark.parametrize(
    ("sde", "weight"), [("flow", "InverseDtWeight"), ("dance", "EqualizingWeight")]
)
def test_guard_preset_uses_its_own_clip_range_and_the_upstream_kernel(sde, weight):
    kernel = regclip.make_kernel(sde, 0.5, sigma_max=0.9 if sde == "flow" else None)
    loss = build_loss(
        RegclipOptions(), sde=sde, kernel=kernel, upstream_clip_range=1e-4, upstream_adv_clip=5.0
    )
    assert loss.surrogate.high == 2e-6 and loss.kernel is kernel
    assert loss.normalizer.name == "ratio_norm" and loss.normalizer.source == "auto"
    assert type(loss.reweighter).__name__ == weight
    custom = build_loss(
        RegclipOptions(clip_range=1e-5, ratio_source="log_prob"),
        sde=sde,
        kernel=kernel,
        upstream_clip_range=1e-4,
        upstream_adv_clip=5.0,
    )
    assert custom.surrogate.low == 1e-5 and custom.normalizer.source == "log_prob"


def test_store_finds_each_transition_by_its_draw_after_shuffling():
    store = TransitionStore(device="cpu")
    draws, means = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    rows = torch.arange(6)
    store.record(draws[:3], mean=means[:3], row=rows[:3])
    store.record(draws[3:], mean=means[3:], row=rows[3:])
    perm = torch.randperm(6)
    found = store.lookup(draws[perm], ["mean", "row"])
    assert torch.equal(found["mean"], means[perm]) and torch.equal(found["row"], perm)
    with pytest.raises(KeyError, match="not recorded during the rollout"):
        store.lookup(draws[:2] + 1e-3, ["mean"])
    # latents kept in bf16 after the fp32 step that drew them
    found = store.lookup(draws[perm].to(torch.bfloat16), ["row"])
    assert torch.equal(found["row"], perm)
    with pytest.raises(KeyError, match="not recorded during the rollout"):
        store.lookup((draws[:2] + 1e-1).to(torch.bfloat16), ["mean"])
    store.clear()
    assert len(store) == 0


def test_store_rounding_fallback_refuses_ambiguous_draws_and_follows_new_records():
    store = TransitionStore(device="cpu")
    with pytest.raises(KeyError, match="0 stored"):  # an empty store has no rounded keys
        store.lookup(torch.zeros(1, 3, 4, 4).bfloat16(), ["row"])
    base = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    twin = base.clone()
    twin.view(-1)[0] = torch.nextafter(base.view(-1)[0], torch.tensor(float("inf")))
    store.record(torch.cat([base, twin]), row=torch.arange(2))
    assert not torch.equal(base, twin) and torch.equal(base.bfloat16(), twin.bfloat16())
    with pytest.raises(KeyError, match="1 of 1 transitions"):  # two stored draws round alike
        store.lookup(base.bfloat16(), ["row"])
    other = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    store.record(other, row=torch.tensor([7, 8]))  # recorded after the table was built
    assert store.lookup(other.flip(0).bfloat16(), ["row"])["row"].tolist() == [8, 7]
    assert store.lookup(other.half(), ["row"])["row"].tolist() == [7, 8]
    store.clear()  # refilled to the same count: the old table must not survive
    fresh = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    store.record(fresh, row=torch.arange(10, 14))
    assert store.lookup(fresh.bfloat16(), ["row"])["row"].tolist() == [10, 11, 12, 13]


def test_injected_gradient_replaces_upstreams_even_when_upstream_clips():
    theta = torch.randn(5, requires_grad=True)
    value = (theta**2).sum(dim=0, keepdim=True)  # upstream's log-prob
    ours = (theta.sin() * torch.arange(5.0)).sum()  # regclip's loss
    out = inject_gradient(value, ours)
    assert torch.equal(out, value.detach())
    upstream_loss = torch.clamp(out.exp(), 0.0, 0.0).sum() + 3 * out.sum()
    upstream_loss.backward()
    torch.testing.assert_close(theta.grad, theta.detach().cos() * torch.arange(5.0))


def _loss_output(seed):
    torch.manual_seed(seed)
    x = torch.randn(4, 8)
    loss = regclip.presets.grpo_guard(sde="flow", kernel=regclip.FlowSDE(0.7, 0.9))
    return loss(
        advantages=torch.randn(4),
        mean=x + 1e-3,
        old_mean=x,
        next_sample=x + 0.1 * torch.randn(4, 8),
        std=torch.full((4,), 0.1),
        dt=torch.full((4,), -0.1),
        t=torch.full((4,), 0.5),
    )


def test_metric_log_averages_calls_and_resets():
    log = MetricLog()
    a, b = _loss_output(0), _loss_output(1)
    log.add(a, 0)
    log.add(b, 2)
    flushed = log.flush()
    assert flushed["regclip/loss"] == pytest.approx((a.metrics["loss"] + b.metrics["loss"]) / 2)
    assert {"regclip/step00/ratio/mean", "regclip/step02/clip/frac"} <= set(flushed)
    assert log.flush() == {}


def test_logger_proxy_merges_train_logs_and_stops_after_max_steps():
    logged = []
    wandb = SimpleNamespace(log=lambda data, step=None: logged.append(data), run="r")
    metrics = MetricLog()
    proxy = LoggerProxy(wandb, metrics, lambda d: "inner_epoch" in d, max_steps=2)
    metrics.add(_loss_output(0), 1)
    proxy.log({"images": 1})
    proxy.log({"loss": 1.0, "inner_epoch": 0}, step=0)
    assert proxy.run == "r" and "regclip/loss" not in logged[0] and "regclip/loss" in logged[1]
    with pytest.raises(StopTraining):
        proxy.log({"loss": 1.0, "inner_epoch": 0}, step=1)
    assert len(logged) == 3


def test_patches_are_undone_in_reverse_order():
    owner = SimpleNamespace(f=1)
    patches = Patches()
    assert patches.set(owner, "f", 2) == 1
    patches.set(owner, "f", 3)
    patches.undo()
    assert owner.f == 1


def test_version_checks_name_the_function_and_the_commit():
    def step(self, model_output, timestep, sample, noise_level=0.7):
        return model_output + noise_level

    require_parameters(step, ("self", "model_output"), "abc1234")
    with pytest.raises(IncompatibleUpstreamError, match=r"step.*abc1234"):
        require_parameters(step, ("self", "sample"), "abc1234")
    require_source(step, ["model_output  +  noise_level"], "abc1234")
    with pytest.raises(IncompatibleUpstreamError, match="lacks"):
        require_source(step, ["prev_sample_mean"], "abc1234")


def test_main_block_runs_in_the_modules_namespace(tmp_path, monkeypatch):
    (tmp_path / "fake_upstream_script.py").write_text(
        textwrap.dedent("""
        CALLS = []
        def main(tag):
            CALLS.append((tag, helper()))
        def helper():
            return "upstream"
        if __name__ == "__main__":
            main("ran")
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_upstream_script as module

    assert module.CALLS == []
    monkeypatch.setattr(module, "helper", lambda: "patched")
    run_main_block(module)
    assert module.CALLS == [("ran", "patched")]
    sys.modules.pop("fake_upstream_script")


@pytest.mark.parametrize(
    ("ending", "expected"),
    [("", 0), ("raise SystemExit(3)", 3), ("raise StopTraining('max steps')", 0)],
)
def test_launch_runs_the_scripts_main_block_inside_the_adapter(
    tmp_path, monkeypatch, capsys, ending, expected
):
    (tmp_path / "fake_train_script.py").write_text(
        textwrap.dedent(f"""
        import sys
        from integrations.common import StopTraining
        ARGV = []
        if __name__ == "__main__":
            ARGV.append(list(sys.argv))
            {ending}
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    import fake_train_script as module

    events = []

    class Adapter:
        def __init__(self, upstream, options):
            events.append(("init", options.preset))

        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append(("exit", module.ARGV))

    def load(src):
        events.append(("load", src))
        return SimpleNamespace(root=tmp_path, train_module=module)

    argv = ["--lr", "1e-5", "--regclip_preset", "ratio_norm", "--regclip_src", "/up"]
    try:
        assert launch(argv, load, Adapter, "scripts/train.py") == expected
    finally:
        sys.modules.pop("fake_train_script")
    script = str(tmp_path / "scripts" / "train.py")
    assert events == [
        ("load", "/up"),
        ("init", "ratio_norm"),
        "enter",
        ("exit", [[script, "--lr", "1e-5"]]),
    ]
    assert ("max steps" in capsys.readouterr().out) == ("StopTraining" in ending)


def test_upstream_adapter_installs_on_enter_and_undoes_on_exit():
    upstream = SimpleNamespace(step=lambda x: x + 1)

    class Adapter(UpstreamAdapter):
        def install(self):
            self._originals["step"] = self._patches.set(upstream, "step", self._step)
            return self

        def _step(self, x):
            return 10 * self._originals["step"](x)

    adapter = Adapter(upstream, RegclipOptions(preset="ratio_norm", means_device="cpu"))
    assert adapter.store.device == "cpu" and adapter.loss_fn is None
    with adapter as entered:
        assert entered is adapter and upstream.step(1) == 20
    assert upstream.step(1) == 2
    assert Adapter(upstream).options == RegclipOptions()


def test_launchers_explain_a_missing_checkout_in_one_line(tmp_path, capsys):
    from integrations.dance_grpo.launch import main as dance_main
    from integrations.flow_grpo.launch import main as flow_main

    missing = str(tmp_path / "missing")
    assert "REGCLIP_FLOW_GRPO_SRC" in _one_line_exit(
        lambda: flow_main(["--regclip_src", missing]), capsys
    )
    assert "REGCLIP_DANCEGRPO_SRC" in _one_line_exit(
        lambda: dance_main(["--regclip_src", missing]), capsys
    )


@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo"])
def test_launch_script_help_and_errors_outside_a_checkout_have_no_traceback(tmp_path, name):
    """Run as a user does: ``python integrations/<name>/launch.py ...`` from a folder that is
    not an upstream checkout."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "integrations" / name / "launch.py"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    shown = run("--help")
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "--regclip_preset" in shown.stdout and "upstream's own options" in shown.stdout
    for argv in (["--regclip_src", "/missing"], ["--regclip_clip_range", "abc"]):
        failed = run(*argv)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert failed.stderr.startswith("launch.py: error: ")


def test_a_missing_upstream_dependency_is_named_in_one_line(capsys):
    from integrations.common import command_line

    def load(src):
        raise ModuleNotFoundError("No module named 'einops'", name="einops")

    line = _one_line_exit(lambda: command_line([], load, None, "train.py"), capsys)
    assert "'einops'" in line and "requirements" in line


def test_dance_advantages_follow_train_one_step():
    rewards = torch.rand(8)
    args = SimpleNamespace(use_group=True, num_generations=4)
    adv = dance_advantages(args, rewards, rewards)
    reference = regclip.group_advantages(
        rewards, torch.arange(8) // 4, std="group", eps=1e-8, unbiased=True, gather=False
    )
    torch.testing.assert_close(adv, reference)
    gathered = torch.cat([rewards, torch.rand(8)])
    args.use_group = False
    expected = (rewards - gathered.mean()) / (gathered.std() + 1e-8)
    torch.testing.assert_close(dance_advantages(args, rewards, gathered), expected)


@pytest.mark.parametrize(
    ("steps", "fraction", "expected"), [(16, 0.6, 9), (12, 1.0, 11), (4, 0.6, 1)]
)
def test_dance_train_timesteps(steps, fraction, expected):
    assert (
        train_timesteps(SimpleNamespace(sampling_steps=steps, timestep_fraction=fraction))
        == expected
    )


def test_flow_launcher_names_the_scripts_and_commits(tmp_path, capsys):
    from integrations.dance_grpo.launch import main as dance_main
    from integrations.flow_grpo.adapter import SCRIPTS, SUPPORTED, load_upstream
    from integrations.flow_grpo.launch import main as flow_main

    src = ["--regclip_src", str(tmp_path)]
    assert "train_flux" in _one_line_exit(
        lambda: flow_main([*src, "--regclip_script", "train_nope"]), capsys
    )
    assert "not an option of this launcher" in _one_line_exit(
        lambda: dance_main([*src, "--regclip_script", "train_flux"]), capsys
    )
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "train_flux.py").write_text("# a modified script\n")
    with pytest.raises(IncompatibleUpstreamError, match=r"9745241.*train_flux") as error:
        launch([*src, "--regclip_script", "train_flux"], load_upstream, None, "train.py")
    assert "ac4c86e" in str(error.value) and "REGCLIP_ALLOW_UNTESTED_UPSTREAM" in str(error.value)
    line = _one_line_exit(lambda: flow_main([*src, "--regclip_script", "train_flux"]), capsys)
    assert "9745241" in line and "REGCLIP_ALLOW_UNTESTED_UPSTREAM" in line
    assert {"train_sd3", "train_sd3_fast", "train_flux", "train_flux_fast"} <= set(SCRIPTS)
    assert {"train_qwenimage", "train_wan2_1"} <= set(
        SUPPORTED["9745241cf1101407e9b518dd4f10498092150522"]
    )


@pytest.mark.parametrize(
    ("options", "kl_coef"),
    [
        (RegclipOptions(preset="flow_grpo"), 0.04),
        (RegclipOptions(preset="dance_grpo", adv_clip=2.0), 0.0),
        (RegclipOptions(preset="grpo_guard", reweight="equalizing", fused=True), 0.0),
        (RegclipOptions(preset="grpo_guard_official"), 0.04),
        (RegclipOptions(preset="velocity_guard", ratio_source="closed_form"), 0.0),
        (RegclipOptions(preset="kl_mask", ratio_source="log_prob"), 0.1),
    ],
)
def test_build_loss_builds_its_parts_once_and_sets_nothing_afterwards(
    options, kl_coef, monkeypatch
):
    """Every part is given to the constructor: no attribute of a built loss or of its
    normalizer is assigned, and the parts are the intended ones."""
    constructed = []
    modules = (regclip.GuardedPPOLoss, regclip.RatioNormalizer)
    originals = {cls: cls.__init__ for cls in modules}

    def init(cls):
        def wrapped(self, *args, **kwargs):
            originals[cls](self, *args, **kwargs)
            constructed.append(self)

        return wrapped

    def setattr_guard(self, name, value):
        if any(self is built for built in constructed):
            raise AssertionError(f"{type(self).__name__}.{name} set after construction")
        torch.nn.Module.__setattr__(self, name, value)

    for cls in modules:
        monkeypatch.setattr(cls, "__init__", init(cls))
    monkeypatch.setattr(regclip.GuardedPPOLoss, "__setattr__", setattr_guard, raising=False)
    monkeypatch.setattr(regclip.RatioNormalizer, "__setattr__", setattr_guard, raising=False)
    kernel = regclip.FlowSDE(0.7, sigma_max=0.95)
    loss = build_loss(
        options,
        sde="flow",
        kernel=kernel,
        upstream_clip_range=3e-4,
        upstream_adv_clip=4.0,
        kl_coef=kl_coef,
        kl_variance="sigma",
    )
    monkeypatch.undo()
    exact = options.preset in ("flow_grpo", "dance_grpo", "grpo_guard_official")
    expected_source = options.ratio_source or ("log_prob" if exact else "auto")
    assert loss.kernel is kernel and loss.fused == options.fused
    assert loss.normalizer.source == expected_source
    assert loss.adv_clip == (options.adv_clip or 4.0)
    if kl_coef > 0:
        assert (loss.kl.coef, loss.kl.variance) == (kl_coef, "sigma")
    else:
        assert loss.kl is None
    reference = regclip.presets.from_name(
        options.preset,
        **({} if options.preset in ("flow_grpo", "dance_grpo") else {"kernel": kernel}),
    )
    assert type(loss.normalizer) is type(reference.normalizer)
    assert (loss.normalizer.debias, loss.normalizer.scale) == (
        reference.normalizer.debias,
        reference.normalizer.scale,
    )
    assert type(loss.surrogate) is type(reference.surrogate)
    if options.preset == "grpo_guard":
        assert type(loss.reweighter).__name__ == "EqualizingWeight"
    else:
        assert type(loss.reweighter) is type(reference.reweighter)
    if exact:
        assert loss.surrogate.high == 3e-4


def _mixed_output(seed, *, kl):
    """A seeded loss call with ratios spread enough that some samples clip."""
    g = torch.Generator().manual_seed(seed)
    batch = 3 + seed % 4
    x = torch.randn(batch, 8, generator=g)
    kernel = regclip.FlowSDE(0.7, 0.9)
    loss = regclip.presets.mean_revised(sde="flow", kernel=kernel, kl_coef=0.1 if kl else 0.0)
    return loss(
        advantages=torch.randn(batch, generator=g),
        mean=x + 0.05 * torch.randn(batch, 8, generator=g),
        old_mean=x,
        next_sample=x + 0.1 * torch.randn(batch, 8, generator=g),
        std=torch.full((batch,), 0.1),
        dt=torch.full((batch,), -0.1),
        t=torch.full((batch,), 0.5),
        ref_mean=x if kl else None,
    )


def _mixed_calls():
    """(output, step index) pairs: int steps, (B,) tensors of steps, KL in some calls."""
    calls = []
    for seed in range(8):
        out = _mixed_output(seed, kl=seed % 3 == 0)
        batch = out.ratio.shape[0]
        if seed % 2:
            step = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(seed))
        else:
            step = seed % 3
        calls.append((out, step))
    return calls


def _reference_flush(calls):
    """What the logger got before: running means of `metrics` over calls, and per step the
    ratio mean and population stds over the step's samples pooled across calls."""
    names = {name for out, _ in calls for name in out.metric_tensors}
    expected = {
        f"regclip/{name}": sum(
            float(out.metric_tensors[name]) for out, _ in calls if name in out.metric_tensors
        )
        / len(calls)
        for name in names
    }
    ratio = torch.cat([out.ratio.detach().double() for out, _ in calls])
    log_ratio = torch.cat([out.log_ratio.detach().double() for out, _ in calls])
    clipped = torch.cat([out.clipped.double() for out, _ in calls])
    steps = torch.cat(
        [torch.as_tensor(step).reshape(-1).expand(out.ratio.shape[0]) for out, step in calls]
    )
    for step in steps.unique().tolist():
        sel = steps == step
        expected[f"regclip/step{step:02d}/ratio/mean"] = float(ratio[sel].mean())
        expected[f"regclip/step{step:02d}/ratio/std"] = float(ratio[sel].std(unbiased=False))
        expected[f"regclip/step{step:02d}/log_ratio/std"] = float(
            log_ratio[sel].std(unbiased=False)
        )
        expected[f"regclip/step{step:02d}/clip/frac"] = float(clipped[sel].mean())
    return expected


def test_metric_log_flush_equals_the_pooled_reference_and_timestep_diagnostics():
    calls = _mixed_calls()
    log = MetricLog()
    diagnostics = regclip.TimestepDiagnostics()
    for out, step in calls:
        log.add(out, step)
        diagnostics.update(step, out)
    flushed = log.flush()
    expected = _reference_flush(calls)
    assert set(flushed) == set(expected)
    assert "regclip/loss/kl" in flushed and "regclip/step03/clip/frac" in flushed
    clip_fracs = [v for k, v in flushed.items() if k.endswith("/clip/frac") and "step" in k]
    assert any(0 < v < 1 for v in clip_fracs)  # the batch exercises clipping
    for key, value in expected.items():
        assert flushed[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    for step, stats in diagnostics.summary().items():  # the definitions used before
        for name in MetricLog.PER_STEP:
            key = f"regclip/step{step:02d}/{name}"
            assert flushed[key] == pytest.approx(stats[name], rel=1e-9, abs=1e-12), key
    assert log.flush() == {}
    log.add(*calls[0])  # reset: the next flush sees only new calls
    assert log.flush() == pytest.approx(_reference_flush(calls[:1]), rel=1e-6, abs=1e-12)


def test_metric_log_keeps_integer_metrics_exact_beside_low_precision_ones():
    out = SimpleNamespace(
        metric_tensors={
            "loss": torch.tensor(1001.0, dtype=torch.bfloat16),  # bf16 rounds 1001 to 1000
            "count": torch.tensor(2**30 + 1),
        },
        ratio=torch.ones(2),
        log_ratio=torch.zeros(2),
        clipped=torch.zeros(2, dtype=torch.bool),
    )
    log = MetricLog()
    log.add(out, 0)  # type: ignore[arg-type]
    flushed = log.flush()
    assert flushed["regclip/count"] == 2**30 + 1 and flushed["regclip/loss"] == 1000.0


def test_metric_log_add_never_reads_a_value_on_the_host(monkeypatch):
    calls = _mixed_calls()

    def refuse(*args, **kwargs):
        raise AssertionError("MetricLog.add synchronised with the device")

    log = MetricLog()
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(regclip.LossOutput, "metrics", property(refuse))
        for out, step in calls:
            log.add(out, step)
    flushed = log.flush()
    expected = _reference_flush(calls)
    assert flushed == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_a_seen_tensor_matches_only_itself_unwritten():
    tensor = torch.zeros(3)
    seen = SeenTensor.of(tensor)
    assert seen.matches(tensor) and not seen.matches(torch.zeros(3))
    assert not seen.matches(tensor[:])  # a view is another tensor object
    tensor.add_(1)  # written in place
    assert not seen.matches(tensor)
    del tensor  # freed: the weak reference holds nothing
    assert seen.ref() is None


def test_a_batch_schedule_is_for_its_tensors_until_one_is_written_in_place():
    from integrations.flow_grpo.adapter import _BatchSchedule

    sample = {"next_latents": torch.zeros(2, 3, 4), "timesteps": torch.ones(2, 3)}
    scheduler = SimpleNamespace(timesteps=torch.arange(3.0), sigmas=torch.linspace(1, 0, 4))
    empty, config = torch.empty(0), SimpleNamespace()
    schedule = _BatchSchedule(
        tuple(SeenTensor.of(x) for x in _BatchSchedule.identity(sample, scheduler)),
        empty, empty, empty, config, regclip.GuardedPPOLoss(),
    )  # fmt: skip
    assert schedule.is_for(sample, scheduler, config)
    assert not schedule.is_for(sample, scheduler, SimpleNamespace())  # another run's config
    assert not schedule.is_for({**sample, "next_latents": torch.zeros(2, 3, 4)}, scheduler, config)
    sample["timesteps"].mul_(2)  # same tensor, new values: not the batch it was read for
    assert not schedule.is_for(sample, scheduler, config)


def test_flow_grpo_adapter_builds_one_loss_per_schedule_and_never_swaps_its_kernel():
    from integrations.flow_grpo.adapter import FlowGRPOAdapter

    adapter = FlowGRPOAdapter.__new__(FlowGRPOAdapter)  # the loss plumbing only
    UpstreamAdapter.__init__(
        adapter,
        SimpleNamespace(spec=SimpleNamespace(sde="sd3", backward="replace", kl_variance="sigma")),
        RegclipOptions(preset="grpo_guard"),
    )
    adapter._loss_kernel_key = None
    config = SimpleNamespace(
        sample=SimpleNamespace(sde_type="sde", noise_level=0.7),
        train=SimpleNamespace(beta=0.0, clip_range=1e-4, adv_clip_max=5.0),
    )
    sigmas = torch.linspace(1.0, 0.0, 11)
    first = adapter._loss_fn(config, sigmas)
    assert adapter._loss_fn(config, sigmas.clone()) is first  # same schedule: same loss
    assert first.kernel.sigma_max == pytest.approx(0.9)
    other = adapter._loss_fn(config, torch.linspace(1.0, 0.0, 6))
    assert other is not first and other.kernel.sigma_max == pytest.approx(0.8)
    assert first.kernel.sigma_max == pytest.approx(0.9)  # the first loss is untouched
    assert adapter.loss_fn is other


def test_store_records_without_host_reads_and_keys_all_draws_in_one(monkeypatch) -> None:
    """``record`` reads nothing back; the first lookup keys every draw recorded since in
    one transfer; a lookup given the draws' heads reads nothing."""
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(4, 4, 8, generator=g) for _ in range(3)]
    means = [torch.randn(4, 4, 8, generator=g) for _ in range(3)]
    store = TransitionStore()
    heads = store.heads(draws[1])
    copies: list[tuple[int, ...]] = []
    host_copy = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return host_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    for draw, mean in zip(draws, means, strict=True):
        store.record(draw, mean=mean)
    assert copies == []
    found = store.lookup(draws[1], ["mean"], heads=heads)["mean"]
    assert copies == [(12, store.key_size)]
    torch.testing.assert_close(found, means[1], rtol=0, atol=0)
    draws[2].mul_(2.0)  # the draw changes in place after it was recorded: its key does not
    found = store.lookup(draws[2] / 2.0, ["mean"])  # without heads: one transfer for them
    assert copies == [(12, store.key_size), (4, store.key_size)] and len(store) == 12
    torch.testing.assert_close(found["mean"], means[2], rtol=0, atol=0)
