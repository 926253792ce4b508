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


def _runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    if args.tiny:
        flow = ["--arch", "tiny", "--resolution", "16", "--num_steps", "4", "--seq", "8"]
        dance = ["--arch", "tiny", "--resolution", "32", "--sampling_steps", "4", "--seq", "8"]
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
        ]
    flow += ["--src", args.flow_src, "--batch", "4", "--group", "2", "--train_batches", "2"]
    dance += ["--src", args.dance_src, "--num_generations", "4", "--check_means"]
    flow_cmd = ["integrations.flow_grpo.smoke", *flow, "--epochs", "2", "--preset"]
    dance_cmd = ["integrations.dance_grpo.smoke", *dance, "--steps", "2", "--preset"]
    return [  # the guard runs first: they matter most if time runs out
        ("flow_grpo/grpo_guard", [*flow_cmd, "grpo_guard"]),
        ("dance_grpo/grpo_guard", [*dance_cmd, "grpo_guard"]),
        ("flow_grpo/flow_grpo", [*flow_cmd, "flow_grpo"]),
        ("dance_grpo/dance_grpo", [*dance_cmd, "dance_grpo"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flow_src", required=True)
    parser.add_argument("--dance_src", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    merged: dict[str, object] = {
        "upstream_commits": {
            "yifan123/flow_grpo": FLOW_GRPO_COMMIT,
            "XueZeyue/DanceGRPO": DANCEGRPO_COMMIT,
        },
        "script": "python -m integrations.gpu_smoke" + (" --tiny" if args.tiny else ""),
        "runs": {},
    }
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name, command in _runs(args):
            out = os.path.join(scratch, name.replace("/", "_") + ".json")
            start = time.perf_counter()
            print(f"== {name}", flush=True)
            done = subprocess.run([sys.executable, "-m", *command, "--out", out], check=False)
            entry: dict[str, object] = {
                "returncode": done.returncode,
                "wall_seconds": time.perf_counter() - start,
            }
            if done.returncode == 0 and Path(out).exists():
                entry.update(json.loads(Path(out).read_text()))
            else:
                failures += 1
            merged["runs"][name] = entry  # type: ignore[index]
            Path(args.out).write_text(json.dumps(merged, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
