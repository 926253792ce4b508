r"""GRPO on the disc world for many runs at once, in lockstep on one device.

Runs that share a kernel and a number of passes form an ensemble: member ``e`` of an
:class:`~regclip.demo.nets.EnsembleMixer` is run ``e``'s generator, started from the
pretrained member of its pretraining seed, with its own loss (method and clip range), its own
proxy rater and its own noise stream (seeded by its GRPO seed, so two methods under the same
seed see the same first rollout). The summed loss backpropagates into disjoint parameters,
gradients are norm-clipped per member, and Adam is elementwise, so each member trains exactly
as it would alone.

One iteration: an SDE rollout of ``groups * group_size`` samples per member, the proxy reward
of the final samples (clamped to images), group-relative advantages, then ``passes``
optimizer steps, each on the loss of all ``T * B`` transitions re-scored under the current
network. Every ``eval_every`` iterations each member draws ODE samples from one fixed noise
and is scored by its proxy and by the world's exact gold fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..advantages import group_advantages
from ..batch import TransitionBatch
from ..diagnostics import calibrate_clip_range
from ..loss import GuardedPPOLoss, LossOutput
from ..trust_region import transition_kl
from .arms import RunSpec, build_loss, kernel_for, parse_method
from .config import DemoConfig
from .nets import EnsembleMixer
from .pretrain import Pretrained
from .reward import LinearProxy
from .rollout import Rollout, ode_sample, score, sde_rollout, time_schedule
from .world import DiscWorld, fit_discs, to_image

__all__ = ["RunRecord", "calibrate", "run_ensemble"]

TRAIN_METRICS = ("log_ratio/shift_z", "log_ratio/std", "clip/frac", "clip/pos_high", "clip/neg_low")
"""Loss metrics recorded per iteration on the second and the last pass."""


@dataclass
class RunRecord:
    """Everything one run produced."""

    spec: RunSpec
    clip_range: float | None
    curve: list[dict[str, float]] = field(default_factory=list)
    """Per evaluation: iteration, proxy, gold, hack, contrast, residual (means over samples)."""
    train: list[dict[str, float]] = field(default_factory=list)
    """Per iteration: rollout proxy and the loss metrics of pass 2 and the last pass."""
    clip_by_step: list[list[float]] = field(default_factory=list)
    """Per iteration, per timestep: clip fraction on pass 2 (or the adaptive ranges)."""
    images: dict[str, Tensor] = field(default_factory=dict)
    """"start" / "end": (n, 1, S, S) ODE samples in [0, 1]."""
    final_ranges: list[float] = field(default_factory=list)
    """Per timestep, the adaptive controller's clip range at the end (adaptive arms)."""
    optimizer_steps: int = 0
    """Optimizer steps taken (``passes`` per completed iteration)."""


def _per_member_grad_clip(params: Sequence[torch.nn.Parameter], max_norm: float) -> None:
    """Clip each member's gradient (leading axis) to ``max_norm`` in L2 over all params."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.ndim - 1))))


def _advantages(rewards: Tensor, group_size: int, steps: int) -> Tensor:
    """(E, B) rewards -> (E, T*B) group-relative advantages, repeated over the T steps."""
    labels = torch.arange(rewards.shape[1], device=rewards.device) // group_size
    adv = torch.stack([group_advantages(r, labels) for r in rewards])
    return adv.repeat(1, steps)


class _Ensemble:
    """Networks, losses and noise of the runs that train together."""

    def __init__(
        self,
        cfg: DemoConfig,
        runs: Sequence[RunSpec],
        pre: Pretrained,
        proxies: dict[int, LinearProxy],
        bases: dict[str, float],
        device: torch.device,
    ) -> None:
        sdes = {r.sde for r in runs}
        if len(sdes) != 1 or len({r.passes for r in runs}) != 1:
            raise ValueError("an ensemble's runs must share the kernel and the passes")
        self.cfg, self.runs, self.device = cfg, list(runs), device
        self.times = time_schedule(cfg.num_steps, cfg.shift)
        self.kernel = kernel_for(sdes.pop(), cfg, self.times).to(device)
        states = [pre.states[r.generator_seed] for r in runs]
        dims = (cfg.size, cfg.patch, cfg.width, cfg.depth)
        self.net = EnsembleMixer.from_members(states, *dims).to(device)
        self.net.checkpoint_blocks = cfg.checkpoint_blocks
        self.ref = None
        if any(r.base == "flow_grpo_kl" for r in runs):
            self.ref = EnsembleMixer.from_members(states, *dims).to(device).requires_grad_(False)
        self.losses: list[GuardedPPOLoss] = [
            build_loss(r, cfg, self.kernel, self.times, bases[r.method]).to(device) for r in runs
        ]
        self.proxies = [proxies[r.rater_seed] for r in runs]
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.gens = [torch.Generator(device).manual_seed(10_007 + r.seed) for r in runs]
        self.batch = cfg.groups * cfg.group_size

    @torch.no_grad()
    def rollout(self) -> tuple[Rollout, Tensor, Tensor, Tensor, Tensor | None]:
        """A rollout; its (E, B) rewards; (E, T*B) advantages; the rollout policy's means
        re-scored in the training passes' layout (so the first pass's ratio is exactly 1);
        the reference means, or None without a KL arm."""
        roll = sde_rollout(self.net, self.kernel, self.times, self.batch, self.gens)
        rewards = torch.stack([p(x) for p, x in zip(self.proxies, roll.final, strict=True)])
        adv = _advantages(rewards, self.cfg.group_size, self.cfg.num_steps)
        old_means = score(self.net, self.kernel, roll)[0]
        ref = None if self.ref is None else score(self.ref, self.kernel, roll)[0]
        return roll, rewards, adv, old_means, ref

    def losses_of(self, roll: Rollout, old_means: Tensor, adv: Tensor, ref: Tensor | None) -> list:
        means, std = score(self.net, self.kernel, roll)
        return [
            loss_fn(
                advantages=adv[e],
                mean=means[e],
                old_mean=old_means[e],
                next_sample=roll.next_states[e],
                std=std,
                dt=roll.dt,
                t=roll.t,
                ref_mean=None if ref is None else ref[e],
            )
            for e, loss_fn in enumerate(self.losses)
        ]

    def step(self, outs: list) -> None:
        self.opt.zero_grad(set_to_none=True)
        torch.stack([o.loss for o in outs]).sum().backward()
        _per_member_grad_clip(list(self.net.parameters()), 1.0)
        self.opt.step()
        for loss_fn in self.losses:
            controller_step = getattr(loss_fn.surrogate, "step", None)
            if callable(controller_step):
                controller_step()

    def optimizer_steps(self) -> int:
        """Adam steps taken so far, read from the optimizer's own state."""
        state = self.opt.state.get(next(iter(self.net.parameters())), {})
        return int(state["step"]) if "step" in state else 0

    @torch.no_grad()
    def evaluate(self, noise: Tensor) -> tuple[list[dict[str, float]], Tensor]:
        """Per member: proxy and gold metrics of ODE samples from ``noise``; the images."""
        x = ode_sample(self.net, self.times, noise)
        images = to_image(x)
        world = DiscWorld(self.cfg.size)
        rows = []
        for e, proxy in enumerate(self.proxies):
            fit = fit_discs(world, images[e])
            rows.append(
                {
                    "proxy": proxy(x[e]).mean(),
                    "gold": fit.gold.mean(),
                    "hack": fit.background.mean(),
                    "contrast": fit.contrast.mean(),
                    "residual": fit.residual.mean(),
                }
            )
        values = torch.stack([torch.stack(list(r.values())) for r in rows]).tolist()
        keys = list(rows[0])
        return [dict(zip(keys, v, strict=True)) for v in values], images


def _clip_by_step(out: LossOutput, steps: int) -> Tensor:
    """(T,) clip fraction per timestep of one loss output over a step-major rollout."""
    return out.clipped.view(steps, -1).float().mean(1)


def run_ensemble(
    cfg: DemoConfig,
    runs: Sequence[RunSpec],
    pre: Pretrained,
    proxies: dict[int, LinearProxy],
    bases: dict[str, float],
    device: torch.device,
    log: Callable[[str], None] = print,
    keep_images: int = 0,
) -> list[RunRecord]:
    """Train ``runs`` (same kernel and passes) together; one record per run."""
    ens = _Ensemble(cfg, runs, pre, proxies, bases, device)
    records = [
        RunRecord(r, None if r.clip_scale is None else bases[r.method] * r.clip_scale) for r in runs
    ]
    for rec, loss_fn in zip(records, ens.losses, strict=True):
        ranges = getattr(loss_fn.surrogate, "ranges", None)
        if isinstance(ranges, Tensor):  # the adaptive controller's starting range
            rec.clip_range = float(ranges[0])
    noise_gen = torch.Generator(device).manual_seed(2024)
    eval_noise = torch.randn(
        (cfg.eval_samples, 1, cfg.size, cfg.size), generator=noise_gen, device=device
    )
    passes = runs[0].passes
    start = time.perf_counter()

    middle = cfg.levels[len(cfg.levels) // 2] if cfg.levels else None

    def evaluate(iteration: int) -> Tensor:
        rows, images = ens.evaluate(eval_noise)
        for rec, row, img in zip(records, rows, images, strict=True):
            rec.curve.append({"iteration": iteration, **row})
            gain = row["proxy"] - rec.curve[0]["proxy"]
            if keep_images and middle is not None and "level" not in rec.images and gain >= middle:
                rec.images["level"] = img[:keep_images].cpu()
        return images

    images = evaluate(0)
    for rec, img in zip(records, images, strict=True):
        if keep_images:
            rec.images["start"] = img[:keep_images].cpu()
    for it in range(1, cfg.iterations + 1):
        roll, rewards, adv, old_means, ref = ens.rollout()
        stats: list[dict[str, Tensor]] = [{"rollout_proxy": r.mean()} for r in rewards]
        clip_steps: list[Tensor] = []
        for k in range(passes):
            outs = ens.losses_of(roll, old_means, adv, ref)
            for tag, when in (("pass2", 1), ("last", passes - 1)):
                if k == when and passes > 1:
                    for s, o in zip(stats, outs, strict=True):
                        s.update({f"{tag}/{m}": o.metric_tensors[m] for m in TRAIN_METRICS})
            if k == 1:
                clip_steps = [_clip_by_step(o, cfg.num_steps) for o in outs]
            ens.step(outs)
        keys = list(stats[0])
        values = torch.stack(
            [torch.stack([s[key].float() for key in keys]) for s in stats]
        ).tolist()
        clip_lists = torch.stack(clip_steps).tolist() if clip_steps else [[] for _ in records]
        for rec, v, c in zip(records, values, clip_lists, strict=True):
            rec.train.append({"iteration": it, **dict(zip(keys, v, strict=True))})
            rec.clip_by_step.append(c)
        out_of_time = cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit
        if it % cfg.eval_every == 0 or it == cfg.iterations or out_of_time:
            images = evaluate(it)
            elapsed = time.perf_counter() - start
            mean_proxy = sum(r.curve[-1]["proxy"] for r in records) / len(records)
            mean_gold = sum(r.curve[-1]["gold"] for r in records) / len(records)
            log(
                f"  iteration {it}/{cfg.iterations}: mean proxy {mean_proxy:.3f}, "
                f"mean gold {mean_gold:.3f} ({elapsed:.0f} s)"
            )
        if out_of_time:
            log(f"  stopped after {it} iterations: time limit {cfg.time_limit:.0f} s")
            break
    steps = ens.optimizer_steps()
    for rec, img, loss_fn in zip(records, images, ens.losses, strict=True):
        rec.optimizer_steps = steps
        if keep_images:
            rec.images["end"] = img[:keep_images].cpu()
        ranges = getattr(loss_fn.surrogate, "ranges", None)
        if isinstance(ranges, Tensor):
            rec.final_ranges = ranges.tolist()
    return records


def calibrate(
    cfg: DemoConfig,
    methods: Sequence[str],
    pre: Pretrained,
    proxies: dict[int, LinearProxy],
    device: torch.device,
) -> dict[str, float]:
    """Each method's base clip range: the one that puts ``cfg.clip_target`` of its
    second-pass ratios outside it, on one probe rollout from the first replicate of ``pre``
    (its generator and rater) after one unclipped Adam step (for ``kl_mask``, the matching
    quantile of the per-sample KL; ``adaptive_guard`` starts from GRPO-Guard's)."""
    probe = {m.replace("adaptive_guard", "grpo_guard") for m in methods}
    replicate = min(pre.states)
    bases: dict[str, float] = {}
    for sde in ("flow", "dance"):
        names = sorted(m for m in probe if parse_method(m)[1] == sde)
        if not names:
            continue
        runs = [RunSpec(m, None, 2, replicate) for m in names]
        ens = _Ensemble(cfg, runs, pre, proxies, dict.fromkeys(names, 1.0), device)
        roll, _, adv, old_means, ref = ens.rollout()
        ens.step(ens.losses_of(roll, old_means, adv, ref))
        with torch.no_grad():
            means, std = score(ens.net, ens.kernel, roll)
            outs = ens.losses_of(roll, old_means, adv, ref)
        for e, (name, out) in enumerate(zip(names, outs, strict=True)):
            if parse_method(name)[0] == "kl_mask":
                batch = TransitionBatch(
                    advantages=adv[e], std=std, dt=roll.dt, mean=means[e], old_mean=old_means[e]
                )
                kl = transition_kl(batch)
                bases[name] = float(torch.quantile(kl.double(), 1 - cfg.clip_target))
            else:
                bases[name] = calibrate_clip_range(out.log_ratio, cfg.clip_target)
    for m in methods:
        if m.startswith("adaptive_guard"):
            bases[m] = bases[m.replace("adaptive_guard", "grpo_guard")]
    bad = {m: b for m, b in bases.items() if not (math.isfinite(b) and b > 0)}
    if bad:
        raise RuntimeError(f"clip calibration failed (the probe step did not move): {bad}")
    return bases
