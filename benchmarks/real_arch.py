"""Cost of GRPO rollouts and training steps on the full-size SD3.5-M and FLUX.1-dev
transformers (random bf16 weights, random text embeddings), vanilla Flow-GRPO against
GRPO-Guard in the same run.

Per architecture: one :class:`regclip.trainer.GRPOTrainer` (LoRA r=32, bf16 weights,
bf16 autocast, gradient checkpointing), rewards on the final latents (no VAE). A warm-up
iteration, then ``--repeats`` iterations per method, interleaved. Reported per method:
seconds per rollout (one batch of ``group_size`` samples, all steps), seconds per
training step (one optimizer step = recompute + backward over the K trained SDE steps of
that batch), peak GPU memory of each phase, and the loss call alone (forward + backward
on tensors of the real latent shape) to isolate the guard's own overhead.

    python benchmarks/real_arch.py --out benchmarks/results/real_arch.json          # GPU
    python benchmarks/real_arch.py --tiny --device cpu --out /tmp/real_arch.json     # check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from regclip.trainer import (
    Components,
    GRPOTrainer,
    TrainConfig,
    build_loss,
    get_architecture,
    latent_std,
    random_prompt_set,
)

METHODS = ("flow_grpo", "grpo_guard")

# Upstream recipes: Flow-GRPO SD3.5-M (512 px, 10 steps, CFG 4.5, timestep_fraction 0.99
# -> 9 trained steps); DanceGRPO Flux (16 steps, embedded guidance 3.5, eta 0.3 Dance-SDE
# in DanceGRPO -- here Flow-SDE for both so the two losses see the same kernel,
# timestep_fraction 0.6 -> 9 trained steps; 512 px).
SETTINGS: dict[str, dict[str, Any]] = {
    "sd3": {
        "resolution": 512,
        "num_steps": 10,
        "sde_steps": list(range(9)),
        "cfg_scale": 4.5,
        "group_size": 8,
        "text_len": 333,
    },
    "flux": {
        "resolution": 512,
        "num_steps": 16,
        "sde_steps": list(range(9)),
        "cfg_scale": 1.0,
        "group_size": 4,
        "text_len": 512,
    },
}
TINY: dict[str, Any] = {
    "resolution": 32,
    "num_steps": 4,
    "sde_steps": [0, 1, 2],
    "group_size": 2,
    "text_len": 8,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def build_trainer(arch_name: str, tiny: bool, device: torch.device) -> GRPOTrainer:
    settings = dict(SETTINGS[arch_name])
    if tiny:
        settings.update(TINY)
    arch = get_architecture(arch_name)
    model_config = arch.tiny_config if tiny else arch.full_config
    dtype = torch.float32 if tiny else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = arch.build(dict(model_config)).to(dtype)  # buffers too, as a pipeline would
    finally:
        torch.set_default_dtype(previous)
    prompts = random_prompt_set(
        model_config, 4, settings["text_len"], negative=settings["cfg_scale"] != 1.0
    )
    config = TrainConfig(
        arch=arch_name,
        transformer_config=None,
        vae=None,
        resolution=settings["resolution"],
        num_steps=settings["num_steps"],
        sde_steps=settings["sde_steps"],
        cfg_scale=settings["cfg_scale"],
        group_size=settings["group_size"],
        prompts_per_iteration=1,
        batch_size=settings["group_size"],
        preset="flow_grpo",
        reward="latent_std",
        lora_rank=32,
        lora_alpha=64,
        mixed_precision="no" if tiny else "bf16",
        weight_dtype="float32" if tiny else "bfloat16",
        gradient_checkpointing=True,
        device=device.type,
        output_dir="runs/real_arch",
    )
    components = Components(arch, model, None, prompts, latent_std)
    return GRPOTrainer(config, components)


def time_iteration(trainer: GRPOTrainer) -> dict[str, float | None]:
    device = trainer.device
    _sync(device)
    _peak_reset(device)
    start = time.perf_counter()
    rollouts, _ = trainer.rollout()
    _sync(device)
    rollout_s = time.perf_counter() - start
    rollout_peak = _peak_gib(device)
    _peak_reset(device)
    start = time.perf_counter()
    metrics = trainer.update(rollouts)
    _sync(device)
    update_s = time.perf_counter() - start
    trainer.iteration += 1
    return {
        "rollout_s": rollout_s / len(rollouts),
        "train_step_s": update_s / max(metrics["optimizer_steps"], 1.0),
        "rollout_peak_gib": rollout_peak,
        "train_peak_gib": _peak_gib(device),
        "clip_frac": metrics.get("clip/frac"),
        "finite_loss": float(torch.isfinite(torch.tensor(metrics["loss"])).item()),
    }


def time_loss(
    trainer: GRPOTrainer, method: str, shape: tuple[int, ...], repeats: int = 20
) -> float:
    """Milliseconds of one loss forward + backward on tensors of ``shape`` (no model)."""
    device = trainer.device
    loss_fn = build_loss(method, trainer.kernel, trainer.config.sde)
    g = torch.Generator(device=device).manual_seed(0)
    old = torch.randn(shape, generator=g, device=device)
    nxt = old + 0.1 * torch.randn(shape, generator=g, device=device)
    b = shape[0]
    kwargs = {
        "advantages": torch.randn(b, generator=g, device=device),
        "old_mean": old,
        "next_sample": nxt,
        "std": torch.full((b,), 0.1, device=device),
        "dt": torch.full((b,), -0.1, device=device),
        "t": torch.full((b,), 0.5, device=device),
    }
    times = []
    for i in range(repeats + 3):
        mean = (old + 1e-3 * torch.randn(shape, generator=g, device=device)).requires_grad_(True)
        _sync(device)
        start = time.perf_counter()
        out = loss_fn(mean=mean, **kwargs)
        out.loss.backward()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_arch(arch_name: str, tiny: bool, device: torch.device, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    trainer = build_trainer(arch_name, tiny, device)
    _sync(device)
    result: dict[str, Any] = {
        "build_s": time.perf_counter() - start,
        "params_billion": sum(p.numel() for p in trainer.unwrapped.parameters()) / 1e9,
        "trainable_million": sum(p.numel() for p in trainer.trainable) / 1e6,
        "settings": {
            "resolution": trainer.config.resolution,
            "num_steps": trainer.config.num_steps,
            "trained_sde_steps": len(trainer.sampler.trained_steps),
            "cfg_scale": trainer.config.cfg_scale,
            "group_size": trainer.config.group_size,
            "batch_size": trainer.config.batch_size,
            "gradient_checkpointing": trainer.config.gradient_checkpointing,
            "lora_rank": trainer.config.lora_rank,
            "weights": trainer.config.weight_dtype,
            "mixed_precision": trainer.config.mixed_precision,
        },
    }
    print(
        f"[{arch_name}] built in {result['build_s']:.1f}s, {result['params_billion']:.2f}B params",
        flush=True,
    )
    trainer.loss_fn = build_loss(METHODS[0], trainer.kernel, trainer.config.sde)
    warm = time_iteration(trainer)
    result["warmup"] = warm
    print(f"[{arch_name}] warm-up {warm}", flush=True)
    runs: dict[str, list[dict[str, float | None]]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:
            trainer.loss_fn = build_loss(method, trainer.kernel, trainer.config.sde)
            runs[method].append(time_iteration(trainer))
            print(f"[{arch_name}] {method} {runs[method][-1]}", flush=True)
    latent_shape = tuple(
        trainer.arch.initial_latents(
            trainer.config.batch_size,
            int(trainer.unwrapped.config.in_channels),  # type: ignore[attr-defined]
            trainer.config.resolution,
            trainer.config.resolution,
            torch.Generator(device=device),
            device,
        ).shape
    )
    result["latent_shape"] = list(latent_shape)
    result["methods"] = {}
    for method, values in runs.items():
        summary: dict[str, Any] = {"runs": values}
        for key in ("rollout_s", "train_step_s", "rollout_peak_gib", "train_peak_gib"):
            vals = [v[key] for v in values if v[key] is not None]
            summary[key] = statistics.median(vals) if vals else None
        summary["loss_ms"] = time_loss(trainer, method, latent_shape)
        result["methods"][method] = summary
    base, guard = result["methods"][METHODS[0]], result["methods"][METHODS[1]]
    result["guard_over_vanilla"] = {
        key: guard[key] / base[key]
        for key in ("rollout_s", "train_step_s", "train_peak_gib", "loss_ms")
        if base.get(key) and guard.get(key) is not None
    }
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def merge(paths: list[str], out: Path) -> None:
    """One report from several runs: each architecture keeps the run (and its device,
    torch version and attention backends) that measured it without error."""
    merged: dict[str, Any] = {"benchmark": "benchmarks/real_arch.py", "architectures": {}}
    for path in paths:
        report = json.loads(Path(path).read_text())
        for arch_name, result in report["architectures"].items():
            if "error" in result and arch_name in merged["architectures"]:
                continue
            run = {k: report.get(k) for k in ("device", "torch", "diffusers", "sdpa", "tiny")}
            merged["architectures"][arch_name] = {**result, "run": run}
    out.write_text(json.dumps(merged, indent=1))


def table(path: Path) -> str:
    """The markdown table of ``docs/real_arch.md`` from a result file."""
    report = json.loads(path.read_text())
    rows = [
        "| model | device | setting | method | rollout s | train step s | peak GiB rollout / train | loss ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch_name, result in report["architectures"].items():
        if "error" in result:
            rows.append(f"| {arch_name} | | | failed: {result['error'][:60]} | | | | |")
            continue
        s = result["settings"]
        setting = (
            f"{s['resolution']} px, {s['num_steps']} steps ({s['trained_sde_steps']} trained), "
            f"group {s['group_size']}, CFG {s['cfg_scale']}"
        )
        device = result.get("run", report).get("device")
        for method, m in result["methods"].items():
            rows.append(
                f"| {arch_name} ({result['params_billion']:.2f} B) | {device} | {setting} | {method} "
                f"| {m['rollout_s']:.2f} | {m['train_step_s']:.2f} "
                f"| {m['rollout_peak_gib']:.1f} / {m['train_peak_gib']:.1f} | {m['loss_ms']:.1f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd3", "flux"], choices=sorted(SETTINGS))
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs (a CPU check of the script)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/real_arch.json")
    parser.add_argument(
        "--sdpa",
        default="default",
        choices=["default", "no-cudnn", "efficient"],
        help="scaled-dot-product attention backends: all, all but cuDNN, memory-efficient only",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine the architectures of earlier result files into --out and exit",
    )
    parser.add_argument("--table", metavar="JSON", help="print the markdown table of a result file")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    device = torch.device(args.device)
    if args.sdpa != "default":
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.sdpa == "efficient":
        torch.backends.cuda.enable_flash_sdp(False)
    report: dict[str, Any] = {
        "benchmark": "benchmarks/real_arch.py",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "sdpa": args.sdpa,
        "methods": list(METHODS),
        "architectures": {},
    }
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for arch_name in args.arch:
        try:
            report["architectures"][arch_name] = bench_arch(
                arch_name, args.tiny, device, args.repeats
            )
        except Exception as error:  # record and go on to the next architecture
            report["architectures"][arch_name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[{arch_name}] failed: {error}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out.write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {
                a: r.get("guard_over_vanilla", r.get("error"))
                for a, r in report["architectures"].items()
            }
        )
    )


if __name__ == "__main__":
    main()
