"""Run both adapters for a few steps on full-size architectures with random weights and
merge the figures into one JSON (``benchmarks/results/integrations_gpu.json``).

Flow-GRPO: SD3.5-Medium transformer config (2.5 B) with upstream's LoRA (r=32) at 512 px,
10 SDE steps, batches of 4 (2 prompts x 2), two training batches per epoch. DanceGRPO:
FLUX.1-dev transformer config (11.9 B), full fine-tuning as ``train_grpo_flux.py`` does
(SGD here: no optimizer state), 512 px, 8 sampling steps, 4 generations, gradient
checkpointing. Each runs the regclip ``grpo_guard`` preset and the vanilla preset.

``python -m integrations.gpu_smoke --flow_src .upstream/flow_grpo --dance_src
.upstream/DanceGRPO --out results.json`` (``--tiny``: the same on tiny models, for a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .dance_grpo.adapter import DANCEGRPO_COMMIT
from .flow_grpo.adapter import FLOW_GRPO_COMMIT


def _runs(args: argparse.Namespace) -> list[tuple[str, list[list[str]]]]:
    """Each run: a name and its command lines, tried in order until one succeeds."""
    if args.tiny:
        flow = ["--arch", "tiny", "--resolution", "16", "--num_steps", "4", "--seq", "8"]
        dance = ["--arch", "tiny", "--resolution", "32", "--sampling_steps", "4", "--seq", "8"]
        dance_fallback = dance
    else:
        flow = [
            "--arch",
            "sd35m",
            "--lora_rank",
            "32",
            "--resolution",
            "512",
            "--num_steps",
            "10",
            "--seq",
            "205",
        ]
        dance = [
            "--arch",
            "flux-dev",
            "--resolution",
            "512",
            "--sampling_steps",
            "8",
            "--seq",
            "512",
            "--gradient_checkpointing",
            "--sdpa",
            "no_cudnn",
        ]
        dance_fallback = [
            "--arch",
            "flux-dev",
            "--resolution",
            "256",
            "--sampling_steps",
            "8",
            "--seq",
            "256",
            "--gradient_checkpointing",
            "--sdpa",
            "math",
        ]
    flow += ["--src", args.flow_src, "--batch", "4", "--group", "2", "--train_batches", "2"]
    tail = ["--src", args.dance_src, "--num_generations", "4", "--check_means", "--steps", "2"]
    flow_cmd = ["integrations.flow_grpo.smoke", *flow, "--epochs", "2", "--preset"]
    dance_cmds = [
        ["integrations.dance_grpo.smoke", *d, *tail, "--preset"] for d in (dance, dance_fallback)
    ]
    runs = [  # the guard runs first: they matter most if time runs out
        ("flow_grpo/grpo_guard", [[*flow_cmd, "grpo_guard"]]),
        ("dance_grpo/grpo_guard", [[*c, "grpo_guard"] for c in dance_cmds]),
        ("flow_grpo/flow_grpo", [[*flow_cmd, "flow_grpo"]]),
        ("dance_grpo/dance_grpo", [[*c, "dance_grpo"] for c in dance_cmds]),
    ]
    return [run for run in runs if args.only in ("all", run[0].split("/")[0])]


def _merge(paths: list[str]) -> dict[str, object]:
    """Later files' runs replace earlier ones of the same name; the replaced ones are kept
    under ``superseded_runs`` (e.g. a first attempt that failed)."""
    merged: dict[str, object] = {"merged_from": []}
    runs: dict[str, object] = {}
    superseded: dict[str, object] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name, run in data.pop("runs").items():
            if name in runs:
                superseded[name] = runs[name]
            runs[name] = run
        merged["merged_from"].append(data.pop("script"))  # type: ignore[attr-defined]
        merged.update(data)
    merged["runs"] = runs
    merged["superseded_runs"] = superseded
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flow_src", default=".upstream/flow_grpo")
    parser.add_argument("--dance_src", default=".upstream/DanceGRPO")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--only", choices=["all", "flow_grpo", "dance_grpo"], default="all")
    parser.add_argument("--merge", nargs="+", help="only merge these result files into --out")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.merge:
        Path(args.out).write_text(json.dumps(_merge(args.merge), indent=1) + "\n")
        return 0
    merged: dict[str, object] = {
        "upstream_commits": {
            "yifan123/flow_grpo": FLOW_GRPO_COMMIT,
            "XueZeyue/DanceGRPO": DANCEGRPO_COMMIT,
        },
        "script": "python -m integrations.gpu_smoke"
        + (" --tiny" if args.tiny else "")
        + (f" --only {args.only}" if args.only != "all" else ""),
        "runs": {},
    }
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name, commands in _runs(args):
            out = os.path.join(scratch, name.replace("/", "_") + ".json")
            attempts: list[dict[str, object]] = []
            entry: dict[str, object] = {"attempts": attempts}
            for command in commands:
                start = time.perf_counter()
                print(f"== {name}: {' '.join(command)}", flush=True)
                done = subprocess.run([sys.executable, "-m", *command, "--out", out], check=False)
                attempts.append(
                    {
                        "command": " ".join(command),
                        "returncode": done.returncode,
                        "wall_seconds": time.perf_counter() - start,
                    }
                )
                if done.returncode == 0 and Path(out).exists():
                    entry.update(json.loads(Path(out).read_text()))
                    break
            else:
                failures += 1
            merged["runs"][name] = entry  # type: ignore[index]
            Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
