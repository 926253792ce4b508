"""How far the GRPO-Guard authors' batch-mean loss (``grpo_guard_official``) is from
regclip's per-sample ``grpo_guard``, at SD3.5-M's latent size (16 x 64 x 64).

One micro-batch of 9 transitions at one sampler step (as the authors' loop trains them),
float64 on CPU; drifts ``mu_theta - mu_old`` of size ``rel * s_t`` per sample, either equal
across the batch or spread 0.1x-10x; advantages N(0, 1) (a shuffled micro-batch mixes
groups, so they need not sum to zero); clip range 2e-6. Reported per (step, drift size,
spread): the smallest gradient cosine and the largest number of the 9 clip decisions that
differ, over ``--seeds`` draws.

    PYTHONPATH=src python benchmarks/official_vs_per_sample.py \\
        --out benchmarks/results/official_vs_per_sample.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import regclip


def compare(step: int, rel: float, spread: bool, seeds: int, batch: int = 9) -> dict[str, float]:
    shape = (16, 64, 64)
    f64 = torch.float64
    sigmas = torch.linspace(1, 0, 11, dtype=f64)
    t = sigmas[step].expand(batch)
    dt = (sigmas[step + 1] - sigmas[step]).expand(batch)
    s = 0.7 * torch.sqrt(t / (1 - t)) * torch.sqrt(-dt)
    view = (-1, 1, 1, 1)
    cos_min, flips_max = 1.0, 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        old = torch.randn(batch, *shape, generator=g, dtype=f64)
        x = old + s.view(view) * torch.randn(batch, *shape, generator=g, dtype=f64)
        size = torch.ones(batch, dtype=f64)
        if spread:
            size = torch.logspace(-1, 1, batch, dtype=f64)[torch.randperm(batch, generator=g)]
        drift = rel * (s * size).view(view) * torch.randn(batch, *shape, generator=g, dtype=f64)
        mean = (old + drift).requires_grad_(True)
        adv = torch.randn(batch, generator=g, dtype=f64)
        grads, clipped = [], []
        for loss_fn in (
            regclip.presets.grpo_guard_official(clip_range=2e-6),
            regclip.presets.grpo_guard(clip_range=2e-6),
        ):
            lp = regclip.gaussian_log_prob
            out = loss_fn(
                advantages=adv, mean=mean, old_mean=old, next_sample=x, std=s, dt=dt, t=t,
                log_prob=lp(x, mean, s), old_log_prob=lp(x, old, s),
            )  # fmt: skip
            grads.append(torch.autograd.grad(out.loss, mean)[0].flatten())
            clipped.append(out.clipped)
        cos = float(torch.nn.functional.cosine_similarity(*grads, dim=0))
        cos_min = min(cos_min, cos)
        flips_max = max(flips_max, int((clipped[0] != clipped[1]).sum()))
    return {"cosine_min": round(cos_min, 5), "clip_flips_max": flips_max}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/official_vs_per_sample.json")
    args = parser.parse_args(argv)
    rows = []
    for step in (1, 3, 6):
        for rel in (0.01, 0.1, 1.0):
            for spread in (False, True):
                row = {"step": step, "drift_over_s": rel, "spread_0.1x_10x": spread}
                row.update(compare(step, rel, spread, args.seeds))
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "benchmark": "benchmarks/official_vs_per_sample.py",
        "batch": 9,
        "latent": [16, 64, 64],
        "clip_range": 2e-6,
        "seeds": args.seeds,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
