"""Cost of the guard on a GPU, as ratios from one run: writes ``benchmarks/results/perf.json``.

Measures, with the device named in the output:

1. per shape (SD3.5-M 512/1024 px, Flux packed 512/1024 px, Wan 480p 81 frames): forward +
   backward of vanilla Flow-GRPO, the public GRPO-Guard formulation, regclip eager, regclip
   fused, regclip fused without stored old means (``guard_formulations``), timed side by side
   (interleaved repeats, medians) in eager mode and as CUDA-graph replays, each checked
   against the eager gradient;
2. the fused autograd function alone (one- and two-launch forward) against its memory
   floor (7 passes over a latent at the measured copy bandwidth);
3. that the fused loss works under ``torch.compile`` and CUDA-graph capture;
4. trajectory memory per rollout sample with and without stored old means (computed from
   tensor sizes, see ``MEMORY_CASES``);
5. the log-ratio bias of bf16-stored old means at the first step on a rollout;
6. the guard's share of a training step: the full-size SD3.5-M transformer (diffusers
   ``SD3Transformer2DModel``, published config, random bf16 weights), forward + backward at
   one timestep, batch 8 at 512 px, next to the loss.

    python benchmarks/perf_gpu.py --out benchmarks/results/perf.json
    python benchmarks/perf_gpu.py --smoke --out /tmp/perf.json       # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard_formulations import (
    CLIP_GUARD,
    CLIP_VANILLA,
    CPU_SHAPES,
    FORMULATIONS,
    GPU_SHAPES,
    Transitions,
    make_transitions,
)
from regclip import presets
from regclip.fused.function import SurrogateConfig, fused_guard

# name -> (latent numel D, sampling steps, trained steps, where the step counts come from)
MEMORY_CASES: dict[str, tuple[int, int, int, str]] = {
    "sd35m_512": (
        16 * 64 * 64,
        10,
        9,
        "Flow-GRPO SD3.5-M recipes: 10 steps, timestep_fraction 0.99",
    ),
    "sd35m_1024": (16 * 128 * 128, 10, 9, "as SD3.5-M 512 px"),
    "flux_512": (1024 * 64, 16, 9, "DanceGRPO Flux scripts: 16 steps, last dropped, fraction 0.6"),
    "flux_1024": (4096 * 64, 16, 9, "as Flux 512 px"),
    "wan_480p_81f": (16 * 21 * 60 * 104, 20, 19, "assumed: 20 steps, all but the last trained"),
}

SD35M_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
TEXT_TOKENS = 333  # CLIP 77 + T5 256, SD3's joint text sequence


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_call_ms(fn: Callable[[Any], Any], inputs: list[Any], iters: int, device: str) -> float:
    """Mean ms per call over ``iters`` back-to-back calls (rotating input sets), measured
    with device events around the loop: launch gaps count, as they do in training."""
    sync(device)
    if device != "cuda":
        start = time.perf_counter()
        for i in range(iters):
            fn(inputs[i % len(inputs)])
        return (time.perf_counter() - start) * 1e3 / iters
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for i in range(iters):
        fn(inputs[i % len(inputs)])
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / iters


def interleaved(
    fns: dict[str, Callable[[Any], Any]], inputs: list[Any], iters: int, repeats: int, device: str
) -> dict[str, list[float]]:
    """Per-call ms of each function, repeats interleaved across functions (drift cancels)."""
    for fn in fns.values():
        for i in range(3):
            fn(inputs[i % len(inputs)])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(per_call_ms(fn, inputs, iters, device))
    return times


def graph_ms(fn: Callable[[Any], Any], inputs: Any, replays: int = 200) -> float:
    """ms per replay of ``fn(inputs)`` captured in a CUDA graph (launch gaps removed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(inputs)
    for _ in range(10):
        graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / replays


def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, median of 10."""
    if device != "cuda":
        return float("nan")
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return 2 * src.numel() * 4 / (statistics.median(times[2:]) * 1e-3) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fused_function(finalize_in_reduction: bool) -> Callable[[Transitions], torch.Tensor]:
    """The fused autograd function alone (no batch checks, no LossOutput): kernel cost."""
    bounds = (1 - CLIP_GUARD, 1 + CLIP_GUARD)
    cfg = SurrogateConfig(True, 1, 1, 5.0, *bounds, None, finalize_in_reduction)

    def run(tr: Transitions) -> torch.Tensor:
        args = (tr.mean, tr.noise, tr.next_sample, tr.std, tr.dt, tr.advantages)
        loss = fused_guard(*args, cfg, noise=True)[0]
        return torch.autograd.grad(loss, tr.mean)[0]

    return run


def bench_shapes(
    shapes: dict[str, tuple[int, tuple[int, ...]]],
    device: str,
    iters: int,
    repeats: int,
    bandwidth: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (batch, shape) in shapes.items():
        log(f"shape {name}: B={batch} {shape}")
        gen = torch.Generator(device=device).manual_seed(0)
        sets = [make_transitions(batch, shape, device, gen) for _ in range(3)]
        dim = sets[0].mean[0].numel()
        reference = FORMULATIONS["eager"](sets[0])
        checks = {
            m: rel_err(FORMULATIONS[m](sets[0]), reference)
            for m in ("public", "fused", "fused_noise")
        }
        fns: dict[str, Callable[[Any], Any]] = dict(FORMULATIONS)
        fns["fused_fn_1launch"] = fused_function(True)
        fns["fused_fn_2launch"] = fused_function(False)
        if device != "cuda":
            fns = {k: v for k, v in fns.items() if not k.startswith("fused_fn")}
        times = interleaved(fns, sets, iters, repeats, device)
        eager = {k: statistics.median(v) for k, v in times.items()}
        graphs: dict[str, float] = {}
        if device == "cuda":
            for method, fn in fns.items():
                try:
                    graphs[method] = graph_ms(fn, sets[0])
                except Exception as exc:  # record and go on: one failure must not hide the rest
                    graphs[method] = float("nan")
                    log(f"  graph capture of {method} failed: {exc!r}")
        floor_bytes = 7 * batch * dim * 4
        out[name] = {
            "batch": batch,
            "shape": list(shape),
            "D": dim,
            "grad_rel_err_vs_eager": checks,
            "eager_ms": eager,
            "eager_ms_repeats": times,
            "graph_ms": graphs,
            "fused_floor_ms": floor_bytes / (bandwidth * 1e9) * 1e3
            if bandwidth == bandwidth
            else None,
            "ratios_eager": {
                "eager/vanilla": eager["eager"] / eager["vanilla"],
                "fused/vanilla": eager["fused"] / eager["vanilla"],
                "fused_noise/vanilla": eager["fused_noise"] / eager["vanilla"],
                "public/vanilla": eager["public"] / eager["vanilla"],
                "eager/public": eager["eager"] / eager["public"],
                "fused/public": eager["fused"] / eager["public"],
                "fused/eager": eager["fused"] / eager["eager"],
            },
            "ratios_graph": (
                {
                    "eager/vanilla": graphs["eager"] / graphs["vanilla"],
                    "fused/vanilla": graphs["fused"] / graphs["vanilla"],
                    "fused/public": graphs["fused"] / graphs["public"],
                    "fused/eager": graphs["fused"] / graphs["eager"],
                }
                if graphs
                else {}
            ),
        }
        log("  " + "  ".join(f"{k} {v:.4f}" for k, v in eager.items()) + "  (ms, eager)")
        if graphs:
            log("  " + "  ".join(f"{k} {v:.4f}" for k, v in graphs.items()) + "  (ms, graph)")
        log(f"  grad rel err vs eager: {checks}")
        del sets
    return out


def host_overhead(device: str, smoke: bool, iters: int, repeats: int) -> dict[str, float]:
    """ms per call of the host-side pieces (eager, launch gaps included): what a launch-bound
    loss cannot go below on this machine."""
    batch, shape = (CPU_SHAPES if smoke else GPU_SHAPES)["sd35m_512"]
    tr = make_transitions(batch, shape, device, torch.Generator(device=device).manual_seed(4))
    loss_fn = presets.grpo_guard(sde="flow", clip_range=CLIP_GUARD)
    loss_fn.validate, loss_fn.fused = False, True
    kw = dict(
        advantages=tr.advantages,
        mean=tr.mean,
        next_sample=tr.next_sample,
        noise=tr.noise,
        std=tr.std,
        dt=tr.dt,
    )
    small = torch.zeros(8, device=device)
    leaf = torch.zeros(8, device=device, requires_grad=True)
    stats = torch.zeros(19, device=device)
    fns: dict[str, Callable[[Any], Any]] = {
        "one_torch_op": lambda _: small.add_(1.0),
        "trivial_autograd_fwd_bwd": lambda _: torch.autograd.grad((leaf * 2.0).sum(), leaf),
        "metric_dict_unbind": lambda _: dict(enumerate(stats.unbind(0))),
        "fused_loss_forward_only": lambda _: loss_fn(**kw),
        "fused_loss_forward_backward": lambda _: torch.autograd.grad(loss_fn(**kw).loss, tr.mean),
    }
    if device == "cuda":
        import triton
        import triton.language as tl

        @triton.jit
        def bump(ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(ptr + offs, tl.load(ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

        fns["one_triton_launch"] = lambda _: bump[(1,)](small, 8, BLOCK=8)
    times = interleaved(fns, [None], iters, repeats, device)
    return {name: statistics.median(values) for name, values in times.items()}


def check_compile_and_graph(device: str, smoke: bool) -> dict[str, Any]:
    """The fused loss under torch.compile (default and fullgraph) and CUDA-graph capture."""
    result: dict[str, Any] = {}
    batch, shape = (CPU_SHAPES if smoke else GPU_SHAPES)["sd35m_512"]
    tr = make_transitions(batch, shape, device, torch.Generator(device=device).manual_seed(1))
    loss_fn = presets.grpo_guard(sde="flow", clip_range=CLIP_GUARD)
    loss_fn.validate, loss_fn.fused = False, True
    kw = dict(
        advantages=tr.advantages, next_sample=tr.next_sample, noise=tr.noise, std=tr.std, dt=tr.dt
    )
    reference = torch.autograd.grad(loss_fn(mean=tr.mean, **kw).loss, tr.mean)[0]
    for fullgraph in (False, True):
        key = f"torch_compile{'_fullgraph' if fullgraph else ''}"
        try:
            torch._dynamo.reset()
            compiled = torch.compile(
                lambda mean: loss_fn(mean=mean, **kw).loss, fullgraph=fullgraph
            )
            grad = torch.autograd.grad(compiled(tr.mean), tr.mean)[0]
            err = rel_err(grad, reference)
            ms = statistics.median(
                per_call_ms(
                    lambda t, f=compiled: torch.autograd.grad(f(t.mean), t.mean)[0],
                    [tr],
                    20,
                    device,
                )
                for _ in range(5)
            )
            result[key] = {"ok": err < 1e-5, "grad_rel_err": err, "ms": ms}
        except Exception as exc:
            result[key] = {"ok": False, "error": repr(exc)[:500]}
        log(f"{key}: {result[key]}")
    if device == "cuda":
        try:
            mean = tr.mean.detach().clone().requires_grad_()
            static = dict(kw, mean=mean)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    loss_fn(**static).loss.backward()
            torch.cuda.current_stream().wait_stream(side)
            mean.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = loss_fn(**static)
                out.loss.backward()
            graph.replay()
            torch.cuda.synchronize()
            assert mean.grad is not None
            err = rel_err(mean.grad, reference)
            result["cuda_graph"] = {
                "ok": err < 1e-5,
                "grad_rel_err": err,
                "metrics_after_replay": out.metrics,
            }
        except Exception as exc:
            result["cuda_graph"] = {"ok": False, "error": repr(exc)[:500]}
        log(f"cuda_graph: {result['cuda_graph'].get('ok')} {result['cuda_graph'].get('error', '')}")
    return result


def trajectory_memory() -> dict[str, Any]:
    """Bytes per rollout sample: fp32 latents x_0..x_T (as Flow-GRPO stores them), fp32
    log-probs and timesteps per step; plus fp32 old means per trained step (stored) or one
    int64 seed (regenerated noise)."""
    out: dict[str, Any] = {}
    for name, (dim, steps, trained, source) in MEMORY_CASES.items():
        base = (steps + 1) * dim * 4 + steps * (4 + 4)
        stored = base + trained * dim * 4
        seeded = base + 8
        out[name] = {
            "D": dim,
            "steps": steps,
            "trained_steps": trained,
            "step_counts_from": source,
            "old_mean_per_step_KiB": dim * 4 / 1024,
            "trajectory_MiB_without_old_means": base / 2**20,
            "trajectory_MiB_with_stored_old_means": stored / 2**20,
            "trajectory_MiB_with_seed": seeded / 2**20,
            "stored_old_means_overhead": stored / base - 1,
        }
    return out


def bf16_bias(device: str, smoke: bool) -> dict[str, Any]:
    """First step on a rollout (mu = mu_old), unit-scale latents of SD3.5-M 512 px: the
    log-ratio should be 0; bf16-stored old means shift it by mean(e^2)/(2 s^2) (vanilla) or
    mean(e^2)/s (RatioNorm). Mean log-ratio and fraction of A > 0 samples clipped."""
    batch, shape = (CPU_SHAPES if smoke else GPU_SHAPES)["sd35m_512"]
    batch = 64
    gen = torch.Generator(device=device).manual_seed(2)
    out: dict[str, Any] = {}
    for s in (0.03, 0.05, 0.1, 0.2):
        old = torch.randn(batch, *shape, device=device, generator=gen)
        noise = torch.randn(batch, *shape, device=device, generator=gen)
        nxt = old + s * noise
        e2 = float(((old - old.bfloat16().float()) ** 2).mean())
        row: dict[str, Any] = {"mean_e2": e2}
        for preset, clip in (("flow_grpo", CLIP_VANILLA), ("grpo_guard", CLIP_GUARD)):
            loss_fn = presets.from_name(preset, clip_range=clip)
            common = dict(
                advantages=torch.ones(batch, device=device),
                mean=old,
                next_sample=nxt,
                std=s,
                dt=-0.1,
            )
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                low = loss_fn(**common, old_mean=old.bfloat16()).metrics
            exact = loss_fn(**common, noise=noise).metrics
            row[preset] = {
                "clip_range": clip,
                "predicted_bias": e2 / (2 * s * s) if preset == "flow_grpo" else e2 / s,
                "log_ratio_mean_bf16": low["log_ratio/mean"],
                "clip_pos_high_bf16": low["clip/pos_high"],
                "log_ratio_mean_regenerated": exact["log_ratio/mean"],
                "clip_pos_high_regenerated": exact["clip/pos_high"],
            }
        out[f"s={s}"] = row
    return out


def sd35m_share(device: str, smoke: bool, guard_ms: dict[str, float]) -> dict[str, Any]:
    """Full-size SD3.5-M transformer forward + backward at one timestep vs the loss."""
    from diffusers import SD3Transformer2DModel

    config = dict(SD35M_CONFIG)
    batch, text_tokens, latent = 8, TEXT_TOKENS, 64
    if smoke:
        config.update(num_layers=2, dual_attention_layers=(0,), num_attention_heads=2, attention_head_dim=8,
                      joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16)  # fmt: skip
        batch, text_tokens, latent = 2, 7, 8
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = SD3Transformer2DModel(**config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=device).manual_seed(3)

    def inputs() -> dict[str, torch.Tensor]:
        return dict(
            hidden_states=torch.randn(
                batch, 16, latent, latent, device=device, generator=gen
            ).bfloat16(),
            encoder_hidden_states=torch.randn(
                batch, text_tokens, config["joint_attention_dim"], device=device, generator=gen
            ).bfloat16(),
            pooled_projections=torch.randn(
                batch, config["pooled_projection_dim"], device=device, generator=gen
            ).bfloat16(),
            timestep=torch.rand(batch, device=device, generator=gen) * 1000,
        )

    sets = [inputs() for _ in range(2)]

    def step(kw: dict[str, torch.Tensor]) -> None:
        out = model(**kw, return_dict=False)[0]
        out.float().square().mean().backward()

    for i in range(2):
        step(sets[i % 2])
    times = [per_call_ms(step, sets, 2, device) for _ in range(3)]
    model_ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "model": "diffusers SD3Transformer2DModel, SD3.5-Medium config, random bf16 weights",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": params,
        "batch": batch,
        "latent": [16, latent, latent],
        "text_tokens": text_tokens,
        "forward_backward_ms": model_ms,
        "forward_backward_ms_repeats": times,
        "peak_memory_GiB": peak,
        "loss_ms_eager": guard_ms,
        "loss_share_of_step": {k: v / (model_ms + v) for k, v in guard_ms.items()},
        "note": "one timestep, no CFG (Flow-GRPO trains with CFG: the model cost doubles); "
        "full-parameter bf16 gradients; no optimizer step",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/perf.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)"
    )
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke for a CPU check")
    iters, repeats = (3, 2) if args.smoke else (args.iters, args.repeats)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(sys.argv),
        "timing": "eager: events around back-to-back calls (launch gaps included), "
        f"{iters} calls x {repeats} interleaved repeats, median, 3 rotating input sets; "
        "graph: CUDA-graph replays of one input set (launch gaps removed)",
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if device == "cuda":
        result["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")

    sections: list[tuple[str, Callable[[], Any]]] = [
        ("copy_bandwidth_GBps", lambda: copy_bandwidth_gbps(device)),
        ("trajectory_memory", trajectory_memory),
        ("bf16_old_mean_bias", lambda: bf16_bias(device, args.smoke)),
        (
            "shapes",
            lambda: bench_shapes(
                CPU_SHAPES if args.smoke else GPU_SHAPES,
                device,
                iters,
                repeats,
                result["copy_bandwidth_GBps"],
            ),
        ),
        ("host_overhead_ms", lambda: host_overhead(device, args.smoke, iters, repeats)),
        ("compile_and_graph", lambda: check_compile_and_graph(device, args.smoke)),
    ]
    if not args.skip_model:
        sections.append(
            (
                "sd35m_step_share",
                lambda: sd35m_share(
                    device,
                    args.smoke,
                    {
                        m: result["shapes"]["sd35m_512"]["eager_ms"][m]
                        for m in ("vanilla", "public", "eager", "fused", "fused_noise")
                    },
                ),
            )
        )
    for key, section in sections:
        log(f"== {key}")
        try:
            result[key] = section()
        except Exception as exc:
            traceback.print_exc()
            result[key] = {"error": repr(exc)[:1000]}
        save()
    if "shapes" in result and "error" not in result["shapes"]:
        sd = result["shapes"].get("sd35m_512", {})
        result["targets"] = {
            "fused_fwd_bwd_ms_sd35m_512_b8": sd.get("eager_ms", {}).get("fused"),
            "fused_fwd_bwd_target_ms": 0.15,
            "guard_no_slower_than_vanilla_every_shape_fused": all(
                v["ratios_eager"]["fused/vanilla"] <= 1.0 for v in result["shapes"].values()
            ),
            "guard_no_slower_than_vanilla_every_shape_eager": all(
                v["ratios_eager"]["eager/vanilla"] <= 1.0 for v in result["shapes"].values()
            ),
        }
        save()
        print(f"\ndevice: {result['device']}  (ms per forward+backward, eager; graph replay in [])")
        methods = list(next(iter(result["shapes"].values()))["eager_ms"])
        print(f"{'shape':>14} " + " ".join(f"{m:>18}" for m in methods))
        for name, row in result["shapes"].items():
            cells = [
                f"{row['eager_ms'][m]:.4f}[{row['graph_ms'].get(m, float('nan')):.4f}]"
                for m in methods
            ]
            print(f"{name:>14} " + " ".join(f"{c:>18}" for c in cells))
        print("targets:", result["targets"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
