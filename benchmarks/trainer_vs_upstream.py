"""``regclip train`` against upstream Flow-GRPO's own training iteration, side by side in one
process: the full-size SD3.5-M and FLUX.1-dev transformers (random bf16 weights from the
diffusers configs), same resolution, steps, trained steps, group size, batch, LoRA rank
and targets, precision and optimizer.

* **upstream**: Flow-GRPO 9745241's ``train_sd3.py`` / ``train_flux.py``: its sampling
  function (``pipeline_with_logprob``, VAE decode included), a stand-in reward, and the
  ``for j in train_timesteps`` loop of its ``main`` run from upstream's source
  (``integrations/flow_grpo/smoke.py``), with upstream's AdamW behind accelerate.
* **regclip**: :class:`regclip.trainer.GRPOTrainer` (``grpo_guard``) on a transformer that
  shares the upstream pipeline's frozen weights (a second module tree over the same
  tensors, with its own LoRA), the same VAE and the same stand-in reward.

Phases per iteration: rollout (upstream: sampling and decoding; regclip: sampling),
reward (upstream: the reward on the decoded images and the advantages; regclip: VAE
decode, reward and advantages), train step (one optimizer step over all trained
steps of the batch, gradient clip and AdamW included), and the whole iteration. The two
sides alternate (order flipped every repeat) for ``--repeats`` iterations after a warm-up;
each phase gets its median, min and max, and its peak GPU memory
(``torch.cuda.max_memory_allocated`` after a reset at the phase's start; the frozen
weights, shared by both sides, are in every figure).

Also measured, on the regclip side, the train step with one lever at a time switched
back (``levers``: gradient checkpointing on, eager loss, value checks on, foreach AdamW,
``timesteps_per_call`` 3, and with ``--compile`` the transformer run eagerly), one repeat
each (the faster of two with ``--compile``); and, for SD3, the largest batch whose
train step fits on an 80 GB H100 (``max_batch``: memory capped at that card's 81559 MiB
with ``torch.cuda.set_per_process_memory_fraction``; a linear fit of the peak at two batch
sizes, then probes around the prediction, catching out-of-memory). ``--max-batch-only``
measures just that, without the timed repeats; with ``--compile`` its probes run blocks
compiled with ``dynamic=True`` (every input dimension symbolic).

    # GPU (planned to take about 5 minutes on one H100 or H200; --compile adds the compilation)
    REGCLIP_FLOW_GRPO_SRC=/path/to/flow_grpo@9745241 PYTHONPATH=src:. \\
        python benchmarks/trainer_vs_upstream.py --out benchmarks/results/trainer_vs_upstream.json
    # CPU check of the script (tiny configs; the upstream side only with the checkout)
    PYTHONPATH=src:. python benchmarks/trainer_vs_upstream.py --tiny --device cpu --repeats 1 \\
        --out /tmp/trainer_vs_upstream.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "src", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from regclip.trainer import (  # noqa: E402
    Components,
    GRPOTrainer,
    TrainConfig,
    get_architecture,
    latent_std,
    random_prompt_set,
)
from regclip.trainer.build import vae_scale_factor  # noqa: E402
from regclip.trainer.trainer import compile_blocks, timestep_chunks  # noqa: E402
from upstream_overhead import (  # noqa: E402
    LORA_TARGETS,
    SCRIPT,
    SETTINGS,
    TINY,
    _config,
    _Prepared,
    add_upstream_lora,
)

PHASES = ("rollout", "reward", "train_step", "iteration")
LR, WEIGHT_DECAY, BETAS, EPS = 3e-4, 1e-4, (0.9, 0.999), 1e-8  # Flow-GRPO's config/base.py
CARD_BYTES = 81559 * 2**20
"""The card the largest batch is sized for: an H100 80GB HBM3 (81559 MiB in nvidia-smi)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Seconds and peak GiB of named phases (device synchronised at each edge)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {p: [] for p in PHASES}
        self.peaks: dict[str, list[float]] = {p: [] for p in PHASES}

    def run(self, phase: str, fn: Callable[[], Any]) -> Any:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = fn()
        _sync(self.device)
        self.seconds[phase].append(time.perf_counter() - start)
        if self.device.type == "cuda":
            self.peaks[phase].append(torch.cuda.max_memory_allocated(self.device) / 2**30)
        return out

    def iteration(self, phases: list[tuple[str, Callable[[Any], Any]]]) -> None:
        """Run ``phases`` in order, each fed the previous one's result; time the whole too."""
        _sync(self.device)
        start = time.perf_counter()
        value: Any = None
        for name, fn in phases:
            value = self.run(name, lambda fn=fn, value=value: fn(value))
        self.seconds["iteration"].append(time.perf_counter() - start)
        if self.peaks["rollout"]:
            self.peaks["iteration"].append(max(self.peaks[p][-1] for p in PHASES[:3]))

    def summary(self) -> dict[str, Any]:
        phases = {}
        for p in PHASES:
            runs = self.seconds[p]
            phases[p] = {
                "median_s": round(statistics.median(runs), 4),
                "min_s": round(min(runs), 4),
                "max_s": round(max(runs), 4),
                "runs_s": [round(x, 4) for x in runs],
                "peak_gib": round(max(self.peaks[p]), 2) if self.peaks[p] else None,
            }
        return {
            "train_step_s": phases["train_step"]["median_s"],
            "iteration_s": phases["iteration"]["median_s"],
            "peak_gib": phases["iteration"]["peak_gib"],
            "phases": phases,
        }


def share_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter and buffer tensors (no copy)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _tile(value: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` rows cycling through ``value``'s rows."""
    return value[torch.arange(batch, device=value.device) % value.shape[0]]


class Upstream:
    """Upstream's iteration on its pipeline (LoRA from peft, as its scripts add it)."""

    def __init__(self, arch: str, src: str, pipe: Any, s: dict[str, Any], accelerator: Any) -> None:
        from integrations.flow_grpo.adapter import load_upstream

        self.arch, self.s, self.pipe, self.accelerator = arch, s, pipe, accelerator
        self.up = load_upstream(src, SCRIPT[arch])
        add_upstream_lora(pipe, arch)
        trainable = [p for p in pipe.transformer.parameters() if p.requires_grad]
        self.optimizer = accelerator.prepare_optimizer(
            torch.optim.AdamW(trainable, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
        )
        self.config = _config(arch, s)
        self.generator = torch.Generator().manual_seed(0)

    def rollout(self, _: Any = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        from integrations.flow_grpo import smoke

        s = self.s
        with torch.no_grad():
            if self.arch == "sd3":
                embeds = smoke.random_embeddings(self.pipe, s["batch"], s["seq"], self.generator)
                images, sample = smoke.rollout(
                    self.up, self.pipe, embeds, self.config, s["resolution"]
                )
                names = {
                    "embeds": torch.cat(
                        [embeds["negative_prompt_embeds"], embeds["prompt_embeds"]]
                    ),
                    "pooled_embeds": torch.cat(
                        [embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]
                    ),
                }
                return images, sample, names
            images, sample = smoke.flux_rollout(
                self.up, self.pipe, self.config, batch=s["batch"], seq=s["seq"],
                resolution=s["resolution"], generator=self.generator,
            )  # fmt: skip
            return images, sample, {"transformer": _Prepared(self.pipe.transformer)}

    def reward(self, rolled: tuple[Any, dict[str, Any], dict[str, Any]]) -> Any:
        from integrations.flow_grpo import smoke

        images, sample, names = rolled
        rewards = latent_std(images)  # the stand-in reward, one group per batch
        sample = smoke.with_advantages(
            sample, rewards, group=self.s["batch"], steps=self.s["trained"]
        )
        return sample, names

    def train_step(self, prepared: tuple[dict[str, Any], dict[str, Any]], steps: int = 0) -> None:
        from integrations.flow_grpo import smoke

        sample, names = prepared
        steps = steps or self.s["trained"]
        self.accelerator.gradient_accumulation_steps = steps
        self.accelerator.step = 0
        self.pipe.transformer.train()
        smoke.run_train_loop(
            self.up, self.pipe, sample, self.config, self.accelerator, self.optimizer, steps,
            **names,
        )  # fmt: skip

    def probe(self, prepared: tuple[dict[str, Any], dict[str, Any]], batch: int) -> None:
        """One trained step at ``batch`` samples (the rollout's rows tiled)."""
        sample, names = prepared
        tiled = {k: _tile(v, batch) if torch.is_tensor(v) else v for k, v in sample.items()}
        if self.arch == "sd3":
            half = names["embeds"].shape[0] // 2
            names = {
                k: torch.cat([_tile(v[:half], batch), _tile(v[half:], batch)])
                for k, v in names.items()
            }
        self.train_step((tiled, names), steps=1)


class Regclip:
    """``regclip train``'s iteration (GRPOTrainer) on the shared weights."""

    def __init__(
        self, arch: str, transformer: torch.nn.Module, vae: Any, s: dict[str, Any],
        accelerator: Any, device: torch.device, tiny: bool, per_call: int,
        compile_transformer: bool = False,
    ) -> None:  # fmt: skip
        cfg_scale = 4.5 if arch == "sd3" else 1.0
        model_config = dict(transformer.config)  # type: ignore[call-overload]
        prompts = random_prompt_set(model_config, 1, s["seq"], negative=cfg_scale != 1.0)
        config = TrainConfig(
            arch=arch,
            vae=None,
            resolution=s["resolution"],
            num_steps=s["num_steps"],
            sde_steps=list(range(s["trained"])),
            cfg_scale=cfg_scale,
            group_size=s["batch"],
            prompts_per_iteration=1,
            batch_size=s["batch"],
            preset="grpo_guard",
            reward="latent_std",
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            lora_rank=32,
            lora_alpha=64,
            lora_targets=list(LORA_TARGETS[arch]),
            mixed_precision="no" if tiny else "bf16",
            weight_dtype="float32" if tiny else "bfloat16",
            timesteps_per_call=per_call,
            compile_transformer=compile_transformer,
            device=device.type,
            output_dir=tempfile.mkdtemp(prefix="trainer_vs_upstream_"),
        )
        arch_adapter = get_architecture(arch, vae_scale_factor(vae))
        components = Components(arch_adapter, transformer, vae, prompts, latent_std)
        self.trainer = GRPOTrainer(config, components, accelerator)

    def train_step(self, rollouts: list[Any]) -> None:
        trainer = self.trainer
        trainer.accelerator.gradient_accumulation_steps = len(trainer.chunks)
        trainer.accelerator.step = 0
        trainer.update(rollouts)
        trainer.iteration += 1

    def rewarded(self, rollouts: list[Any]) -> list[Any]:
        self.trainer.reward(rollouts)
        return rollouts

    def probe(self, rollouts: list[Any], batch: int) -> None:
        """One trained step at ``batch`` samples (the rollout's rows tiled)."""
        trainer = self.trainer
        r = rollouts[0]
        rows = torch.arange(batch) % r.batch_size
        tiled = replace(
            r,
            latents=_tile(r.latents, batch),
            next_latents=_tile(r.next_latents, batch),
            log_probs=_tile(r.log_probs, batch),
            old_means=None if r.old_means is None else _tile(r.old_means, batch),
            noise_seeds=r.noise_seeds[rows],
            final=_tile(r.final, batch),
            embeds=r.embeds.select(rows),
            prompt_ids=r.prompt_ids[rows],
            advantages=None if r.advantages is None else _tile(r.advantages, batch),
        )
        trainer.model.train()
        out = trainer.transitions_loss(tiled, (0,))
        out.loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def first_batch_log_ratio(side: Regclip, rollout: Any, per_call: int = 3) -> dict[str, Any]:
    """Largest |log-ratio| on a fresh rollout (policy unchanged, so exactly 0 in exact
    arithmetic) with one trained step per call and with ``per_call`` steps stacked, and
    the fraction of rows the loss clips: what the larger batch's rounding does."""
    trainer = side.trainer
    trainer.model.train()
    surrogate = trainer.loss_fn.surrogate
    out: dict[str, Any] = {"clip_range": [getattr(surrogate, "low", None), surrogate.high]}
    per_call = min(per_call, rollout.num_sde_steps)
    for name, ks in (("per_step", (0,)), (f"stacked_{per_call}", tuple(range(per_call)))):
        result = trainer.transitions_loss(rollout, ks)
        out[name] = {
            "max_abs_log_ratio": float(result.log_ratio.abs().max()),
            "clipped_frac": float(result.clipped.float().mean()),
        }
    return out


def levers(
    side: Regclip, rollouts: list[Any], device: torch.device, runs: int = 1
) -> dict[str, Any]:
    """The regclip train step with one speed lever switched back at a time: the fastest of
    ``runs`` runs each (with a compiled transformer the first run of a lever that changes
    a shape or the backward compiles)."""
    trainer = side.trainer
    model = trainer.unwrapped
    fused_optimizer = trainer.optimizer.optimizer

    def checkpointing(on: bool) -> None:
        if on:
            model.enable_gradient_checkpointing()  # type: ignore[operator]
        else:
            model.disable_gradient_checkpointing()  # type: ignore[operator]

    fused_loss = trainer.loss_fn.fused

    def eager(on: bool) -> None:
        trainer.loss_fn.fused = fused_loss and not on

    def checks(on: bool) -> None:
        trainer.loss_fn.validate = on

    def foreach_adamw(on: bool) -> None:
        trainer.optimizer.optimizer = (
            torch.optim.AdamW(trainer.trainable, lr=LR, weight_decay=WEIGHT_DECAY)
            if on
            else fused_optimizer
        )

    def stacked(per_call: int) -> Callable[[bool], None]:
        def switch(on: bool) -> None:
            k = len(trainer.sampler.trained_steps)
            trainer.chunks = timestep_chunks(
                k, per_call if on else trainer.config.timesteps_per_call
            )

        return switch

    def eager_transformer(on: bool) -> None:
        torch.compiler.set_stance("force_eager" if on else "default")

    variants: dict[str, list[Callable[[bool], None]]] = {
        "baseline": [],
        "gradient_checkpointing": [checkpointing],
        "eager_loss": [eager],
        "loss_value_checks": [checks],
        "foreach_adamw": [foreach_adamw],
        "timesteps_per_call_3": [stacked(3)],
    }
    if trainer.config.compile_transformer:
        variants["eager_transformer"] = [eager_transformer]
    result: dict[str, Any] = {}
    for name, switches in variants.items():
        meter = Meter(device)
        try:
            for switch in switches:
                switch(True)
            for _ in range(runs):
                meter.run("train_step", lambda: side.train_step(rollouts))
            best = min(range(runs), key=meter.seconds["train_step"].__getitem__)
            result[name] = {
                "train_step_s": round(meter.seconds["train_step"][best], 4),
                "peak_gib": round(meter.peaks["train_step"][best], 2)
                if meter.peaks["train_step"]
                else None,
            }
        except torch.OutOfMemoryError:
            result[name] = {"error": "out of memory"}
        finally:
            for switch in reversed(switches):
                switch(False)
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = result["baseline"].get("train_step_s")
    for entry in result.values():
        if base and "train_step_s" in entry:
            entry["vs_baseline"] = round(entry["train_step_s"] / base, 3)
    return result


def largest_batch(
    probe: Callable[[int], None], device: torch.device, start: int, cap: int, budget: int = 3
) -> dict[str, Any]:
    """The largest batch (to within ``resolution``) whose ``probe`` fits under the memory
    cap: the peaks at ``start`` and ``2 start`` give a line; from its prediction, steps of
    1/16 of it go up while the probe fits, or down while it runs out of memory, until
    the boundary is bracketed or ``budget`` more probes are spent."""
    tried: dict[int, float | None] = {}

    def fits(batch: int) -> bool:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            probe(batch)
            _sync(device)
        except torch.OutOfMemoryError:
            tried[batch] = None
            return False
        tried[batch] = (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        )
        return True

    lo: int | None = None
    hi: int | None = None
    step = 1
    if not fits(start):
        hi = start
    elif not fits(2 * start):
        lo, hi = start, 2 * start
    else:
        a, b = tried[start] or 0.0, tried[2 * start] or 0.0
        slope = (b - a) / start
        limit = CARD_BYTES / 2**30 if device.type == "cuda" else 0.0
        guess = int(2 * start + (limit - b) / slope) if slope > 0 else cap
        batch = max(2 * start + 1, min(guess, cap))
        step = max(1, batch // 16)
        lo = 2 * start
        while budget > 0:
            budget -= 1
            if fits(batch):
                lo = batch
                if hi is not None or batch >= cap:
                    break
                batch = min(batch + step, cap)
            else:
                hi = batch
                if batch - step <= lo:
                    break
                batch -= step
    return {
        "largest_fit": lo,
        "first_oom": hi,
        "resolution": step,
        "cap": cap,
        "probes": {
            str(k): (round(v, 2) if v is not None else "oom") for k, v in sorted(tried.items())
        },
    }


def build(arch: str, tiny: bool, device: torch.device) -> Any:
    from integrations.flow_grpo import smoke

    if arch == "sd3":
        return smoke.build_pipeline("tiny" if tiny else "sd35m", seed=0, device=device.type)
    return smoke.build_flux_pipeline("tiny" if tiny else "flux", seed=0, device=device.type)


def bench_arch(
    arch: str,
    args: argparse.Namespace,
    device: torch.device,
    save: Callable[[dict[str, Any]], None] = lambda entry: None,
) -> dict[str, Any]:
    """One architecture's entry of the report; ``save`` gets it after each section, so a run
    stopped later keeps what it measured."""
    from accelerate import Accelerator

    s = dict(TINY if args.tiny else SETTINGS[arch])
    start = time.perf_counter()
    pipe = build(arch, args.tiny, device)
    accelerator = Accelerator(
        mixed_precision="no" if args.tiny else "bf16", cpu=device.type == "cpu"
    )
    regclip = Regclip(
        arch, share_weights(pipe.transformer), pipe.vae, s, accelerator, device, args.tiny,
        args.timesteps_per_call, args.compile,
    )  # fmt: skip
    upstream = Upstream(arch, args.src, pipe, s, accelerator) if args.src else None
    _sync(device)
    frozen = sum(p.numel() for p in regclip.trainer.unwrapped.parameters() if not p.requires_grad)
    entry: dict[str, Any] = {
        "settings": {
            **s, "lora_rank": 32, "lora_targets": LORA_TARGETS[arch],
            "cfg_scale": 4.5 if arch == "sd3" else 1.0,
            "timesteps_per_call": args.timesteps_per_call,
            "compile_transformer": args.compile,
            "gradient_checkpointing": False,
            "loss_backend": "fused" if regclip.trainer.loss_fn.fused else "eager",
            "frozen_params_billion": round(frozen / 1e9, 3),
            "upstream_script": f"scripts/{SCRIPT[arch]}.py" if upstream else None,
            "upstream_commit": upstream.up.commit if upstream else None,
        },
        "build_s": round(time.perf_counter() - start, 2),
    }  # fmt: skip
    if args.max_batch_only:
        return max_batch_entry(arch, args, device, regclip, upstream, s, entry)
    meters = {"upstream": Meter(device), "regclip": Meter(device)}
    plans: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {
        "regclip": [
            ("rollout", lambda _: regclip.trainer.sample()),
            ("reward", regclip.rewarded),
            ("train_step", regclip.train_step),
        ]
    }
    if upstream is not None:
        plans["upstream"] = [
            ("rollout", upstream.rollout),
            ("reward", upstream.reward),
            ("train_step", upstream.train_step),
        ]
    for plan in plans.values():  # warm-up (and the fused kernels' compilation)
        Meter(device).iteration(plan)
    order = list(plans)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            meters[name].iteration(plans[name])
            gc.collect()
        print(f"[{arch}] repeat {r + 1}/{args.repeats}", flush=True)
    for name in plans:
        entry[name] = meters[name].summary()
    entry["repeats"] = args.repeats
    if upstream is not None:
        up, rc = entry["upstream"], entry["regclip"]
        entry["speedup"] = {  # upstream time over regclip time: > 1 means regclip is faster
            p: round(up["phases"][p]["median_s"] / rc["phases"][p]["median_s"], 3) for p in PHASES
        }
        if up["peak_gib"] is not None:
            entry["peak_ratio"] = round(rc["peak_gib"] / up["peak_gib"], 3)
    save(entry)
    rollouts = regclip.rewarded(regclip.trainer.sample())
    if not args.skip_levers:
        entry["first_batch_log_ratio"] = first_batch_log_ratio(regclip, rollouts[0])
        entry["levers"] = levers(regclip, rollouts, device, runs=2 if args.compile else 1)
        print(f"[{arch}] levers {json.dumps(entry['levers'])}", flush=True)
        save(entry)
    if arch == "sd3" and not args.skip_max_batch:
        max_batch_entry(arch, args, device, regclip, upstream, s, entry, rollouts)
        save(entry)
    return entry  # the models go with this frame; main() collects and empties the cache


def max_batch_entry(
    arch: str,
    args: argparse.Namespace,
    device: torch.device,
    regclip: Regclip,
    upstream: Upstream | None,
    s: dict[str, Any],
    entry: dict[str, Any],
    rollouts: list[Any] | None = None,
) -> dict[str, Any]:
    """``entry["max_batch"]``: each side's :func:`largest_batch` under the 80 GB cap.

    With ``rollouts`` (after the timed run) a compiled transformer probes with its graphs
    as compiled so far: static ones at the timed batch, and from the second batch size on
    dynamo's automatic ones (the dimensions that changed made symbolic). Without
    ``rollouts`` (``--max-batch-only``) regclip samples its own, with any compiled blocks
    run eagerly; a compiled transformer's blocks are then compiled again with
    ``dynamic=True`` (every input dimension symbolic), so the probes share one graph per
    block variant instead of compiling at each batch size."""
    if rollouts is None:
        with torch.compiler.set_stance("force_eager"):
            rollouts = regclip.rewarded(regclip.trainer.sample())
        if args.compile:
            names = regclip.trainer.arch.repeated_blocks
            compile_blocks(regclip.trainer.unwrapped, names, dynamic=True)
            entry["settings"]["compile_dynamic_batch"] = True
    fraction = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, CARD_BYTES / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    start_batch, cap = (2, 16) if args.tiny else (s["batch"], args.max_batch_cap)
    try:
        entry["max_batch"] = {
            "card_gib": round(CARD_BYTES / 2**30, 2),
            "memory_fraction": fraction,
            "regclip": largest_batch(
                lambda b: regclip.probe(rollouts, b), device, start_batch, cap
            ),
        }
        print(f"[{arch}] max batch regclip {json.dumps(entry['max_batch']['regclip'])}", flush=True)
        if upstream is not None:
            prepared = upstream.reward(upstream.rollout())
            entry["max_batch"]["upstream"] = largest_batch(
                lambda b: upstream.probe(prepared, b), device, start_batch, cap
            )
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd3", "flux"], choices=sorted(SETTINGS))
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a CPU check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--src", default=os.environ.get("REGCLIP_FLOW_GRPO_SRC"),
                        help="Flow-GRPO 9745241 checkout; without it only regclip runs")  # fmt: skip
    parser.add_argument("--timesteps-per-call", type=int, default=1)
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile regclip's transformer (the warm-up iteration compiles)",
    )  # fmt: skip
    parser.add_argument("--skip-levers", action="store_true")
    parser.add_argument("--skip-max-batch", action="store_true")
    parser.add_argument(
        "--max-batch-only", action="store_true",
        help="only the largest batch (SD3): no timed repeats, no levers",
    )  # fmt: skip
    parser.add_argument("--max-batch-cap", type=int, default=256)
    parser.add_argument(
        "--sdpa", choices=["default", "no-cudnn"], default="default",
        help="no-cudnn: turn cuDNN attention off (FLUX's backward failed under it on an H100)",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/trainer_vs_upstream.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_batch_only and (args.skip_max_batch or args.arch != ["sd3"]):
        parser.error("--max-batch-only measures SD3 only: pass --arch sd3, not --skip-max-batch")
    if args.timesteps_per_call < 1:
        parser.error(f"--timesteps-per-call must be >= 1, got {args.timesteps_per_call}")
    if args.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    from integrations.standins import install_standins

    install_standins(["absl", "ml_collections", "wandb"])
    import diffusers

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # memory caps need an indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    report: dict[str, Any] = {
        "benchmark": "benchmarks/trainer_vs_upstream.py",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "repeats": 0 if args.max_batch_only else args.repeats,
        "sdpa": args.sdpa,
        "upstream": bool(args.src),
        "archs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save(arch: str, entry: dict[str, Any]) -> None:
        report["archs"][arch] = entry
        report["total_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(report, indent=1) + "\n")

    for arch in args.arch:
        try:
            entry = bench_arch(arch, args, device, functools.partial(save, arch))
        except Exception as error:  # keep the other architecture's numbers
            failed = {"error": f"{type(error).__name__}: {error}"[:500]}
            entry = {**report["archs"].get(arch, {}), **failed}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{arch}] {json.dumps(entry)[:2000]}", flush=True)
        save(arch, entry)  # after each arch: partial runs keep
    print(f"wrote {out} in {report['total_s']} s")
    return 1 if any("error" in e for e in report["archs"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
