"""What the Flow-GRPO adapter costs inside upstream's own training step, side by side in
one process, on the full-size SD3.5-M and FLUX.1-dev transformers (random bf16 weights,
LoRA r=32 as upstream trains them, random prompt embeddings, stand-in rewards).

Per architecture, on one rollout made by upstream's sampling function (``train_sd3.py`` /
``train_flux.py`` of Flow-GRPO 9745241) under the adapter, the ``for j in train_timesteps``
loop of upstream's ``main`` (recompute + loss + backward over K trained steps, one
micro-batch; the optimizer step is left out, it is the same in every mode) is timed:

* ``upstream``: unpatched, upstream's vanilla loss;
* ``grpo_guard``: patched, regclip's ``grpo_guard`` (eager PyTorch);
* ``grpo_guard_fused``: patched, the same loss through the fused Triton kernels;

interleaved, ``--repeats`` times each after a warm-up. Also timed: upstream's rollout
unpatched and patched (the mean recording), and regclip's own trainer (``regclip train``:
:class:`regclip.trainer.GRPOTrainer`, ``grpo_guard``) on the same model config, resolution,
steps and batch. Writes compact JSON with the GPU name.

The adapter's overhead, measured two ways:

* ``paired_ratio``: ``--pairs`` pairs of steps, unpatched and patched-fused back to back
  (order alternating, ``ABBA``), each pair's ratio patched / unpatched; the median ratio
  and a percentile bootstrap 95 % interval of that median (``BOOTSTRAP`` resamples,
  seeded). Pairing cancels the drift that makes separate medians spread by +-10 %.
  ``--time-budget`` stops adding pairs once spent (the count is recorded).
* ``attribution``: one patched-fused step under ``cProfile``: host seconds spent in
  regclip's and the adapter's own Python (:data:`OURS`; not the harness that runs
  upstream's loop in both modes), their functions' own time plus the C calls they make
  directly (``heaviest_ms``: the :data:`HEAVIEST` functions with most of it;
  ``regclip_read_wait_s``: the part spent in the C methods that read device
  values, waiting included; a lower bound of all reads, see :data:`DEVICE_READS`); and, on
  CUDA, the device time of every kernel of one unpatched and one patched step
  (``torch.profiler``): their difference is the device time the patch adds, the ``guard``
  kernels' the fused loss's. Without a profiler, :class:`PatchClock` times the patch's
  entry points whole on :data:`CLOCKED` more steps (``patch_wall_s``): the loss call, the
  ``compute_log_prob`` wrapper less upstream's function, the metric flush, each started on
  a synchronised device (scripts whose ``backward`` is ``inject`` are not clocked). This
  counts the Python of other packages they call and their kernel launches, which
  ``cProfile``'s figure leaves out. The loss's backward runs outside those calls, inside
  upstream's ``accelerator.backward``: :class:`LossBackwardClock` times it on as many steps
  of each mode (``loss_backward_s``), from the loss to the SDE step's mean, so that the
  patched figure is regclip's loss's backward and the unpatched one upstream's.

    # on the GPU machine (about 4 minutes on one H200)
    REGCLIP_FLOW_GRPO_SRC=/path/to/flow_grpo@9745241 PYTHONPATH=src:. \\
        python benchmarks/upstream_overhead.py --out benchmarks/results/upstream_overhead.json
    # CPU check of the script (tiny configs)
    REGCLIP_FLOW_GRPO_SRC=... PYTHONPATH=src:. python benchmarks/upstream_overhead.py \\
        --tiny --device cpu --out /tmp/upstream_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import inspect
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "src", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from integrations.common import Patches, RegclipOptions  # noqa: E402
from integrations.standins import install_standins  # noqa: E402

MODES = ("upstream", "grpo_guard", "grpo_guard_fused")
PAIRED = ("upstream", "grpo_guard_fused")
BOOTSTRAP = 2000
CLOCKED = 3
"""Steps of each paired mode timed without a profiler for the attribution
(:class:`PatchClock`: the patched ones; :class:`LossBackwardClock`: both)."""
HEAVIEST = 10
"""Functions of the patch listed by host time in the attribution (``heaviest_ms``)."""
OURS = tuple(
    str(ROOT / part)
    for part in ("src/regclip/", "integrations/common.py", "integrations/flow_grpo/adapter.py")
)
"""Where the patch's code lives (the attribution's host side): the library and the
Flow-GRPO adapter. The harness that drives upstream's loop in every mode
(``integrations/flow_grpo/smoke.py``, ``integrations/standins.py``) is not the patch's
cost, so it is left out."""
# Flow-GRPO's recipes at 512 px: SD3.5-M 10 steps, CFG 4.5 in training (train.cfg),
# 9 trained steps; Flux 16 steps here (embedded guidance 3.5), 9 trained steps. Micro-batch
# 4 (SD3, doubled by CFG) and 2 (Flux) keep both within one H200 without checkpointing.
SETTINGS: dict[str, dict[str, Any]] = {
    "sd3": {"resolution": 512, "num_steps": 10, "trained": 9, "batch": 4, "seq": 333},
    "flux": {"resolution": 512, "num_steps": 16, "trained": 9, "batch": 2, "seq": 512},
}
TINY: dict[str, Any] = {"resolution": 16, "num_steps": 4, "trained": 3, "batch": 2, "seq": 8}
SCRIPT = {"sd3": "train_sd3", "flux": "train_flux"}
LORA_TARGETS = {
    "sd3": [
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    ],
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"],
}  # fmt: skip


def add_upstream_lora(pipe: Any, arch: str) -> None:
    """Freeze ``pipe.transformer`` and wrap it in the LoRA (rank 32, alpha 64, Gaussian init,
    upstream's target modules) that Flow-GRPO's scripts add."""
    from peft import LoraConfig, get_peft_model

    pipe.transformer.requires_grad_(False)
    pipe.transformer = get_peft_model(
        pipe.transformer,
        LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian",
                   target_modules=LORA_TARGETS[arch]),
    )  # fmt: skip


class _NoStep:
    def step(self) -> None:
        return None

    def zero_grad(self) -> None:
        return None


class _Prepared(torch.nn.Module):
    """``accelerator.prepare``'s wrapper: train_flux.py reads ``transformer.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Any) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def paired_ratio(
    pairs: list[tuple[float, float]], resamples: int = BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """Median of ``b / a`` over ``(a, b)`` pairs and a percentile bootstrap 95 % interval
    of that median (pairs resampled with replacement, ``seed``-ed)."""
    ratios = np.array([b / a for a, b in pairs])
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(resamples, len(ratios))), axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    median = float(np.median(ratios))
    return {
        "median": round(median, 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "pairs": len(ratios),
        "overhead_pct": round(100 * (median - 1), 2),
        "ratios": [round(float(r), 4) for r in ratios],
    }


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]
_Patches = TypeVar("_Patches", bound="_FunctionPatches")


class _FunctionPatches:
    """Plain functions replaced on their owners (a module, or a class for its methods)
    while entered, and restored on exit: each ``(owner, name, wrap)`` of :meth:`_targets`
    puts ``wrap(function)`` in the function's place (through the adapters' own
    :class:`~integrations.common.Patches`). They must be replaced before the adapter
    installs, so that it binds and calls the replacements."""

    def __init__(self) -> None:
        self._patches = Patches()

    def _targets(self) -> list[tuple[Any, str, Wrap]]:
        raise NotImplementedError

    def __enter__(self: _Patches) -> _Patches:
        """Every target is checked first, so a refused one leaves nothing replaced."""
        found = []
        for owner, name, wrap in self._targets():
            fn = vars(owner).get(name)
            if not inspect.isfunction(fn):
                raise TypeError(
                    f"{type(self).__name__} wraps plain functions; {owner.__name__}.{name} is "
                    f"{type(fn).__name__}"
                )
            found.append((owner, name, fn, wrap))
        for owner, name, fn, wrap in found:
            self._patches.set(owner, name, functools.wraps(fn)(wrap(fn)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._patches.undo()


class PatchClock(_FunctionPatches):
    """Host seconds the patch spends inside steps, timed without a profiler.

    ``ours`` are callables of the patch (owner, attribute name), ``theirs`` upstream's
    callables the patch calls back (upstream's ``compute_log_prob`` inside the adapter's
    wrapper). While entered, each is replaced on its owner by a timed wrapper: a call of
    ours that no other call of ours encloses is timed whole, less the calls of theirs it
    makes. Everything else it runs counts (regclip's Python, torch's and Triton's Python,
    kernel launches), unlike ``cProfile``'s own-time figure, and nothing is slowed by a
    profiler. ``sync`` (the device's synchronisation) runs before each such outermost call,
    outside the timed span: the call starts on an idle device, so a read it makes waits for
    its own kernels only, not for upstream's work queued before it (a wait upstream's code
    would pay a moment later anyway). :attr:`seconds` accumulates until reset.

    The backward of the patch's loss runs inside upstream's ``Accelerator.backward``, not in
    these calls: :class:`LossBackwardClock` times it. A function that reads its caller's
    frame sees the wrapper's: the adapter does in the scripts whose ``backward`` is
    ``inject``, which therefore cannot be clocked."""

    def __init__(
        self,
        ours: list[tuple[Any, str]],
        theirs: list[tuple[Any, str]],
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.ours, self.theirs, self.sync = ours, theirs, sync
        self.seconds = 0.0
        self._depth = 0  # calls of ours now on the stack

    def reset(self) -> None:
        self.seconds = 0.0

    def _wrap(self, fn: Callable[..., Any], mine: bool) -> Callable[..., Any]:
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            counted = clock._depth == 0 if mine else clock._depth > 0
            if mine and counted:
                clock.sync()
            clock._depth += mine
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                clock._depth -= mine
                if counted:
                    clock.seconds += elapsed if mine else -elapsed

        return timed

    def _targets(self) -> list[tuple[Any, str, Wrap]]:
        return [
            (owner, name, functools.partial(self._wrap, mine=mine))
            for targets, mine in ((self.ours, True), (self.theirs, False))
            for owner, name in targets
        ]


class LossBackwardClock(_FunctionPatches):
    """Host seconds of the loss's backward in upstream's step, timed without a profiler.

    The span runs from autograd's start on the loss handed to ``accelerator.backward``
    (a hook on that tensor) to the moment the gradient of the SDE step's mean is complete
    (a hook on the third output of upstream's ``compute_log_prob``, ``prev_sample_mean``).
    Autograd runs a node only once its output's gradient is complete, so the span holds the
    nodes between the two and nothing of the transformer's backward, provided every path
    from the loss to the model passes through that one mean, as in ``train_sd3.py`` and
    ``train_flux.py`` (the log-prob is computed from it; the reference pass of ``beta > 0``
    runs without a graph). Unpatched, the span is upstream's ratio, clipping and log-prob
    formula; patched, regclip's loss (upstream's loss is then computed but not
    differentiated). ``sync`` runs before each backward, untimed, so the span is host time
    plus any read of the loss's own kernels. :attr:`seconds` accumulates until reset;
    :attr:`calls` counts backward calls and :attr:`spans` those that reached exactly one
    hooked mean, the only ones counted.

    ``accelerator`` is the class whose ``backward`` the step calls (patched, through the
    adapter's subclass), ``module`` upstream's script module holding ``compute_log_prob``."""

    def __init__(
        self, accelerator: type, module: Any, sync: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__()
        self.accelerator, self.module, self.sync = accelerator, module, sync
        self.seconds, self.calls, self.spans = 0.0, 0, 0
        self._start: float | None = None
        self._ends: list[float] = []

    def reset(self) -> None:
        self.seconds, self.calls, self.spans = 0.0, 0, 0

    def _mark_start(self, grad: torch.Tensor) -> None:
        self._start = time.perf_counter()

    def _mark_end(self, grad: torch.Tensor) -> None:
        self._ends.append(time.perf_counter())

    def _hooking(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            _, _, prev_sample_mean, *_ = out
            if prev_sample_mean.requires_grad:
                prev_sample_mean.register_hook(self._mark_end)
            return out

        return hooked

    def _timing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(accelerator: Any, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sync()
            self._start, self._ends = None, []
            loss.register_hook(self._mark_start)
            result = fn(accelerator, loss, *args, **kwargs)
            self.calls += 1
            if self._start is not None and len(self._ends) == 1:
                self.seconds += self._ends[0] - self._start
                self.spans += 1
            return result

        return timed

    def _targets(self) -> list[tuple[Any, str, Wrap]]:
        return [
            (self.accelerator, "backward", self._timing),
            (self.module, "compute_log_prob", self._hooking),
        ]


DEVICE_READS = ("cpu", "item", "tolist", "numpy", "nonzero")
"""Tensor methods that copy to the host, waiting for the device's queue to get there.
``bool(t)``, ``float(t)`` and ``int(t)`` wait too, but ``cProfile`` records no call for
them: their time is the calling function's own."""


def host_seconds_by_function(
    stats: pstats.Stats, roots: tuple[str, ...], c_methods: tuple[str, ...] | None = None
) -> dict[tuple[str, int, str], float]:
    """Seconds a profile spent in each function defined under ``roots`` (``pstats``'s
    ``(file, line, name)`` key): its own time, plus the time of C functions (``~`` in
    ``pstats``) on calls made directly from it. With ``c_methods``, only the time of those
    methods' C calls made directly from it (for :data:`DEVICE_READS`: a lower bound of the
    time spent reading device values, waiting included)."""

    def ours(path: str) -> bool:
        return path.startswith(roots)

    def counted(name: str) -> bool:
        return c_methods is None or any(name.startswith(f"<method '{m}' ") for m in c_methods)

    seconds: dict[tuple[str, int, str], float] = {}
    for key, (_, _, own, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        path, _, name = key
        if ours(path) and c_methods is None:
            seconds[key] = seconds.get(key, 0.0) + own
        elif path == "~" and counted(name):
            for caller, edge in callers.items():
                if ours(caller[0]):
                    seconds[caller] = seconds.get(caller, 0.0) + edge[2]
    return seconds


def host_seconds_in(
    stats: pstats.Stats, roots: tuple[str, ...], c_methods: tuple[str, ...] | None = None
) -> float:
    """Seconds a profile spent in functions defined under ``roots``: the sum of
    :func:`host_seconds_by_function`."""
    return sum(host_seconds_by_function(stats, roots, c_methods).values())


def heaviest_functions(
    stats: pstats.Stats, roots: tuple[str, ...], count: int = HEAVIEST
) -> dict[str, float]:
    """The ``count`` functions under ``roots`` with the most host time
    (:func:`host_seconds_by_function`), as ``"path:line name": milliseconds``, paths
    relative to the repository where they lie in it, heaviest first."""
    ranked = sorted(host_seconds_by_function(stats, roots).items(), key=lambda kv: -kv[1])
    out = {}
    for (path, line, name), seconds in ranked[:count]:
        where = Path(path)
        shown = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        out[f"{shown}:{line} {name}"] = round(1000 * seconds, 3)
    return out


def kernel_ms(device: torch.device, fn: Callable[[], Any]) -> dict[str, float]:
    """Device milliseconds of each kernel name ``fn`` launches (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / 1e3
    return totals


def attribute(
    device: torch.device,
    step: Callable[[str], Any],
    clocks: tuple[PatchClock, LossBackwardClock] | None = None,
) -> dict[str, Any]:
    """Where the patch's time goes in one step (module docstring: ``attribution``); with
    ``clocks``, also, without a profiler, the patch's host seconds of :data:`CLOCKED`
    patched steps (``patch_wall_s``: their median) and the loss's backward in as many
    steps of each mode (``loss_backward_s``: medians)."""
    profiler = cProfile.Profile()
    _sync(device)
    start = time.perf_counter()
    profiler.enable()
    step(PAIRED[1])
    _sync(device)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    host = host_seconds_in(stats, OURS)
    out: dict[str, Any] = {
        "profiled_step_s": round(wall, 4),
        "regclip_host_s": round(host, 4),
        "regclip_read_wait_s": round(host_seconds_in(stats, OURS, DEVICE_READS), 4),
        "regclip_host_pct": round(100 * host / wall, 2),
        "heaviest_ms": heaviest_functions(stats, OURS),
    }
    if clocks is not None:
        clock, backward = clocks
        walls: list[float] = []
        backwards: dict[str, list[float]] = {mode: [] for mode in PAIRED}
        for _ in range(CLOCKED):
            for mode in PAIRED:
                clock.reset()
                backward.reset()
                patch = clock if mode == PAIRED[1] else contextlib.nullcontext()
                with backward, patch:
                    step(mode)
                if backward.spans != backward.calls or not backward.calls:
                    raise RuntimeError(
                        f"LossBackwardClock: {backward.spans} of {backward.calls} backward "
                        f"calls of a {mode} step ran from the loss to one hooked mean"
                    )
                backwards[mode].append(backward.seconds)
                if patch is clock:
                    walls.append(clock.seconds)
        out["patch_wall_s"] = round(statistics.median(walls), 5)
        out["patch_wall_runs_s"] = [round(w, 5) for w in walls]
        out["loss_backward_s"] = {m: round(statistics.median(v), 5) for m, v in backwards.items()}
    if device.type == "cuda":
        kernels = {mode: kernel_ms(device, lambda mode=mode: step(mode)) for mode in PAIRED}
        base, patched = (sum(kernels[m].values()) for m in PAIRED)
        guard = sum(ms for name, ms in kernels[PAIRED[1]].items() if "guard" in name)
        out.update(
            device_step_ms={m: round(sum(kernels[m].values()), 2) for m in PAIRED},
            device_added_pct=round(100 * (patched - base) / base, 3),
            fused_loss_kernels_ms=round(guard, 3),
            fused_loss_pct=round(100 * guard / patched, 3),
        )
    return out


def _config(arch: str, s: dict[str, Any]) -> Any:
    from integrations.flow_grpo import smoke

    guidance = 4.5 if arch == "sd3" else 3.5
    return smoke.make_config(
        sample__num_steps=s["num_steps"],
        sample__guidance_scale=guidance,
        train__clip_range=1e-4,
        train__max_grad_norm=1.0,
    )


def bench_upstream(arch: str, src: str | None, s: dict[str, Any], tiny: bool,
                   device: torch.device, repeats: int, pairs: int = 0,
                   time_budget: float | None = None) -> dict[str, Any]:  # fmt: skip
    from accelerate import Accelerator
    from integrations.common import MetricLog
    from integrations.flow_grpo import smoke
    from integrations.flow_grpo.adapter import FlowGRPOAdapter, load_upstream

    up = load_upstream(src, SCRIPT[arch])
    start = time.perf_counter()
    dev = device.type
    if arch == "sd3":
        pipe = smoke.build_pipeline("tiny" if tiny else "sd35m", seed=0, device=dev)
    else:
        pipe = smoke.build_flux_pipeline("tiny" if tiny else "flux", seed=0, device=dev)
    add_upstream_lora(pipe, arch)
    _sync(device)
    build_s = time.perf_counter() - start
    config = _config(arch, s)
    generator = torch.Generator().manual_seed(0)
    up.train_module.wandb = smoke.RecordingLogger()
    recorder = FlowGRPOAdapter(up, RegclipOptions(preset="flow_grpo"))

    def rollout() -> tuple[Any, dict[str, Any]]:
        with torch.no_grad():
            if arch == "sd3":
                embeds = smoke.random_embeddings(pipe, s["batch"], s["seq"], generator)
                _, sample = smoke.rollout(up, pipe, embeds, config, s["resolution"])
                return embeds, sample
            _, sample = smoke.flux_rollout(
                up, pipe, config, batch=s["batch"], seq=s["seq"],
                resolution=s["resolution"], generator=generator,
            )  # fmt: skip
            return None, sample

    rollout()  # warm-up, unpatched
    rollout_unpatched = _timed(device, rollout)
    with recorder:
        rollout_patched = _timed(device, rollout)
        embeds, sample = rollout()
    rewards = torch.randn(s["batch"], generator=generator)  # stand-in rewards
    sample = smoke.with_advantages(sample, rewards, group=2, steps=s["trained"])
    names: dict[str, Any] = {}
    if arch == "sd3":
        assert embeds is not None
        names["embeds"] = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
        names["pooled_embeds"] = torch.cat(
            [embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]
        )
    else:
        names["transformer"] = _Prepared(pipe.transformer)

    adapters = {
        "grpo_guard": FlowGRPOAdapter(up, RegclipOptions(preset="grpo_guard")),
        "grpo_guard_fused": FlowGRPOAdapter(up, RegclipOptions(preset="grpo_guard", fused=True)),
    }
    for adapter in adapters.values():
        adapter.store = recorder.store

    def step(mode: str) -> float:
        def run(accelerator_cls: Any) -> None:
            smoke.run_train_loop(
                up, pipe, sample, config, accelerator_cls(gradient_accumulation_steps=s["trained"]),
                _NoStep(), s["trained"], **names,
            )  # fmt: skip

        if mode == "upstream":
            seconds = _timed(device, lambda: run(Accelerator))
        else:
            with adapters[mode]:
                seconds = _timed(device, lambda: run(up.train_module.Accelerator))
        pipe.transformer.zero_grad(set_to_none=True)
        return seconds

    for mode in MODES:  # warm-up (and the fused kernels' compilation)
        step(mode)
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            runs[mode].append(step(mode))
    median = {m: statistics.median(v) for m, v in runs.items()}
    paired: list[tuple[float, float]] = []
    pairs_start = time.perf_counter()
    for i in range(pairs):
        if time_budget is not None and time.perf_counter() - pairs_start > time_budget:
            break
        order = PAIRED if i % 2 == 0 else PAIRED[::-1]
        seconds = {mode: step(mode) for mode in order}
        paired.append((seconds[PAIRED[0]], seconds[PAIRED[1]]))
    fused_used = None
    guard = adapters["grpo_guard_fused"].loss_fn
    if guard is not None:
        from regclip.fused import is_available

        fused_used = bool(is_available(device))
    result = {
        "script": f"scripts/{SCRIPT[arch]}.py",
        "upstream_commit": up.commit,
        "settings": {**s, "lora_rank": 32, "params_billion": _params(pipe.transformer)},
        "build_s": round(build_s, 2),
        "train_step_s": {m: round(v, 4) for m, v in median.items()},
        "patch_overhead_pct": {
            m: round(100 * (median[m] / median["upstream"] - 1), 2) for m in MODES[1:]
        },
        "rollout_s": {
            "upstream": round(rollout_unpatched, 4),
            "patched": round(rollout_patched, 4),
        },
        "fused_kernels_ran": fused_used,
        "runs_s": {m: [round(x, 4) for x in v] for m, v in runs.items()},
    }
    if paired:
        result["paired_ratio"] = {"patched": PAIRED[1], **paired_ratio(paired)}
        clocks = (
            PatchClock(
                ours=[(FlowGRPOAdapter, "replace_loss"), (FlowGRPOAdapter, "_compute_log_prob"),
                      (MetricLog, "flush")],
                theirs=[(up.train_module, "compute_log_prob")],
                sync=lambda: _sync(device),
            ),
            LossBackwardClock(
                up.train_module.Accelerator, up.train_module, sync=lambda: _sync(device)
            ),
        ) if up.spec.backward == "accelerator" else None  # fmt: skip
        result["attribution"] = attribute(device, step, clocks)
    return result


def _params(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e9, 3)


def bench_regclip_train(arch: str, s: dict[str, Any], tiny: bool, device: torch.device,
                        repeats: int) -> dict[str, Any]:  # fmt: skip
    """``regclip train``'s step (GRPOTrainer, grpo_guard) on the same model config."""
    from accelerate.state import AcceleratorState

    import real_arch
    from regclip.trainer import build_loss

    # upstream's Accelerator (another mixed precision) ran in this process first
    AcceleratorState._reset_state(reset_partial_state=True)

    settings = real_arch.TINY if tiny else real_arch.SETTINGS[arch]
    saved = dict(settings)
    settings.update(
        resolution=s["resolution"],
        num_steps=s["num_steps"],
        sde_steps=list(range(s["trained"])),
        group_size=s["batch"],
    )
    try:
        trainer = real_arch.build_trainer(arch, tiny, device)
    finally:
        settings.clear()
        settings.update(saved)
    trainer.loss_fn = build_loss("grpo_guard", trainer.kernel, trainer.config.sde)
    real_arch.time_iteration(trainer)  # warm-up
    runs = [real_arch.time_iteration(trainer) for _ in range(repeats)]
    out = {
        "train_step_s": round(statistics.median(float(r["train_step_s"] or 0) for r in runs), 4),
        "rollout_s": round(statistics.median(float(r["rollout_s"] or 0) for r in runs), 4),
        "gradient_checkpointing": trainer.config.gradient_checkpointing,
        "batch_size": trainer.config.batch_size,
    }
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd3", "flux"], choices=sorted(SETTINGS))
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a CPU check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--pairs", type=int, default=20,
        help="unpatched / patched-fused step pairs for the paired ratio (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds per architecture after which no more pairs start",
    )  # fmt: skip
    parser.add_argument("--src", default=os.environ.get("REGCLIP_FLOW_GRPO_SRC"))
    parser.add_argument("--skip_regclip_train", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/upstream_overhead.json")
    parser.add_argument(
        "--sdpa",
        choices=["default", "no-cudnn"],
        default="default",
        help="no-cudnn: turn cuDNN attention off (FLUX's backward failed under it on an H100)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.pairs < 0:
        parser.error(f"--repeats must be >= 1 and --pairs >= 0, got {args.repeats}, {args.pairs}")
    if args.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not args.src:
        parser.error("set REGCLIP_FLOW_GRPO_SRC (or --src) to a Flow-GRPO 9745241 checkout")
    install_standins(["absl", "ml_collections", "wandb"])
    device = torch.device(args.device)
    import diffusers

    report: dict[str, Any] = {
        "benchmark": "benchmarks/upstream_overhead.py",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "repeats": args.repeats,
        "pairs": args.pairs,
        "sdpa": args.sdpa,
        "archs": {},
    }
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        s = dict(TINY if args.tiny else SETTINGS[arch])
        entry: dict[str, Any] = {}
        try:
            entry = bench_upstream(
                arch, args.src, s, args.tiny, device, args.repeats, args.pairs, args.time_budget
            )
            if device.type == "cuda":  # the upstream pipeline is gone: free its memory
                torch.cuda.empty_cache()
            if not args.skip_regclip_train:
                entry["regclip_train"] = bench_regclip_train(
                    arch, s, args.tiny, device, max(args.repeats - 1, 1)
                )
        except Exception as error:  # keep the other architecture's numbers
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
        report["archs"][arch] = entry
        print(f"[{arch}] {json.dumps(entry)}", flush=True)
        report["total_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after each arch: partial runs keep
    print(f"wrote {out} in {report['total_s']} s")
    return 1 if any("error" in e for e in report["archs"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
