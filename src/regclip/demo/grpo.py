"""GRPO fine-tuning of the digit generator with one ``GuardedPPOLoss`` preset.

One iteration: an SDE rollout of ``group_size`` samples per class (the class is the
prompt), the proxy reward of the final images, group-relative advantages
(:func:`regclip.group_advantages`), then ``passes`` Adam steps, each on the loss of all T
transitions of the rollout re-scored under the current network. The ratio is exactly 1 on
the first pass; ratio and clip statistics are therefore accumulated from the second pass
on, both for the method's own (normalized) ratio and for the raw vanilla ratio of the same
transitions ("before normalization").
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import presets
from ..advantages import group_advantages
from ..diagnostics import TimestepDiagnostics, calibrate_clip_range
from ..kernels import DanceSDE, FlowSDE, TransitionKernel
from ..loss import GuardedPPOLoss, LossOutput
from .config import METHOD_NAMES, DemoConfig
from .data import NUM_CLASSES, Digits
from .metrics import evaluate, proxy_reward
from .pretrain import Pretrained
from .rollout import Rollout, sde_rollout, time_schedule

__all__ = ["MethodSpec", "RunResult", "calibrate", "method_spec", "train_run"]


@dataclass(frozen=True)
class MethodSpec:
    """A named experiment arm: which preset, which SDE, which schedule, KL or not."""

    name: str
    preset: str
    sde: str
    """"flow" or "dance"."""
    shift: float
    kl_coef: float = 0.0

    def times(self, cfg: DemoConfig) -> Tensor:
        return time_schedule(cfg.num_steps, self.shift)

    def kernel(self, cfg: DemoConfig) -> TransitionKernel:
        if self.sde == "flow":
            return FlowSDE.from_sigmas(self.times(cfg), eta=cfg.flow_eta)
        return DanceSDE(eta=cfg.dance_eta)

    def loss(self, cfg: DemoConfig, clip_range: float) -> GuardedPPOLoss:
        if self.preset in ("flow_grpo", "dance_grpo"):
            return presets.from_name(self.preset, clip_range=clip_range, kl_coef=self.kl_coef)
        return presets.from_name(
            self.preset, clip_range=clip_range, kernel=self.kernel(cfg), kl_coef=self.kl_coef
        )


def method_spec(name: str, cfg: DemoConfig) -> MethodSpec:
    """The arm called ``name`` (one of :data:`regclip.demo.config.METHOD_NAMES`).

    ``<preset>`` runs Flow-SDE on the shift-``cfg.shift`` schedule; ``_dance`` swaps in
    Dance-SDE (vanilla becomes ``dance_grpo``); ``_uniform`` uses the uniform schedule;
    ``flow_grpo_kl`` adds the KL penalty of ``cfg.kl_coef``.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    if name == "flow_grpo_kl":
        return MethodSpec(name, "flow_grpo", "flow", cfg.shift, cfg.kl_coef)
    if name.endswith("_dance"):
        base = name.removesuffix("_dance")
        return MethodSpec(name, "dance_grpo" if base == "flow_grpo" else base, "dance", cfg.shift)
    if name.endswith("_uniform"):
        return MethodSpec(name, name.removesuffix("_uniform"), "flow", 1.0)
    return MethodSpec(name, name, "flow", cfg.shift)


@dataclass
class RunResult:
    """What one (method, seed, clip) run produced."""

    evals: list[dict[str, float]] = field(default_factory=list)
    """Per evaluation: step, proxy and the gold metrics."""
    train: list[dict[str, float]] = field(default_factory=list)
    """Per iteration: rollout proxy and second-pass loss metrics (shift_z, clip fractions)."""
    ratio: TimestepDiagnostics = field(default_factory=TimestepDiagnostics)
    """The method's own ratio, passes >= 2."""
    raw_ratio: TimestepDiagnostics = field(default_factory=TimestepDiagnostics)
    """The vanilla ratio of the same transitions, passes >= 2."""
    images: dict[str, Tensor] = field(default_factory=dict)
    """"start" / "end": (10 * k, 1, H, W) ODE samples from the fixed evaluation noise."""


class _Trainer:
    """Shared state of one run: networks, kernel, loss, fixed evaluation noise."""

    def __init__(
        self,
        spec: MethodSpec,
        cfg: DemoConfig,
        pre: Pretrained,
        clip_range: float,
        seed: int,
    ) -> None:
        self.spec, self.cfg, self.pre = spec, cfg, pre
        self.device = next(pre.generator.parameters()).device
        torch.manual_seed(seed)
        self.net = copy.deepcopy(pre.generator).requires_grad_(True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.kernel = spec.kernel(cfg).to(self.device)
        self.times = spec.times(cfg)
        self.loss_fn = spec.loss(cfg, clip_range)
        self.vanilla = presets.flow_grpo(clip_range=clip_range)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.labels = torch.arange(NUM_CLASSES, device=self.device).repeat_interleave(
            cfg.group_size
        )
        self.shape = (1, cfg.size, cfg.size)

    def rollout(self) -> tuple[Rollout, Tensor, Tensor]:
        """A rollout, its (B,) proxy rewards and the (T*B,) advantages."""
        roll = sde_rollout(
            self.net, self.kernel, self.times, self.labels, self.shape, self.generator
        )
        with torch.no_grad():
            # Re-score the rollout in the training pass's batch layout, so that the first
            # pass's ratio is exactly 1 (kernels can round differently per batch shape).
            velocity = self.net(roll.states, roll.t, roll.labels)
            old_means = self.kernel.evaluate(roll.states, velocity, roll.t, roll.dt)[0]
        roll = dataclasses.replace(roll, old_means=old_means)
        rewards = proxy_reward(self.pre.proxy, roll.final, self.labels)
        adv = group_advantages(rewards, self.labels)
        return roll, rewards, adv.repeat(self.cfg.num_steps)

    def loss(
        self,
        roll: Rollout,
        adv: Tensor,
        ref_means: Tensor | None,
    ) -> tuple[LossOutput, Tensor]:
        """The loss of every rollout transition under the current network; also the means."""
        velocity = self.net(roll.states, roll.t, roll.labels)
        mean, std = self.kernel.evaluate(roll.states, velocity, roll.t, roll.dt)
        out = self.loss_fn(
            advantages=adv,
            mean=mean,
            old_mean=roll.old_means,
            next_sample=roll.next_states,
            std=std,
            dt=roll.dt,
            t=roll.t,
            ref_mean=ref_means,
        )
        return out, mean

    @torch.no_grad()
    def reference_means(self, roll: Rollout) -> Tensor | None:
        if self.spec.kl_coef == 0:
            return None
        velocity = self.pre.generator(roll.states, roll.t, roll.labels)
        return self.kernel.evaluate(roll.states, velocity, roll.t, roll.dt)[0]

    def optimizer_step(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()


def calibrate(
    spec: MethodSpec,
    cfg: DemoConfig,
    pre: Pretrained,
    target: float,
    seed: int = 10_007,
) -> float:
    """Clip range that puts ``target`` of this method's second-pass ratios outside it.

    A probe rollout from the pretrained model, one Adam step with a wide (0.5) clip, then
    the method's log-ratios on the second pass feed :func:`regclip.calibrate_clip_range`.
    """
    trainer = _Trainer(spec, cfg, pre, clip_range=0.5, seed=seed)
    roll, _, adv = trainer.rollout()
    ref = trainer.reference_means(roll)
    out, _ = trainer.loss(roll, adv, ref)
    trainer.optimizer_step(out.loss)
    with torch.no_grad():
        out, _ = trainer.loss(roll, adv, ref)
    return calibrate_clip_range(out.log_ratio, target)


def train_run(
    spec: MethodSpec,
    cfg: DemoConfig,
    pre: Pretrained,
    digits: Digits,
    clip_range: float,
    seed: int,
    eval_noise: Tensor,
    on_iteration: Callable[[], None] | None = None,
    ratio: TimestepDiagnostics | None = None,
    raw_ratio: TimestepDiagnostics | None = None,
) -> RunResult:
    """``cfg.steps`` GRPO iterations of one method from the pretrained generator.

    ``eval_noise`` (10 * eval_per_class, 1, H, W) is the fixed evaluation noise; ``ratio``
    and ``raw_ratio`` let several runs pool their per-timestep statistics.
    """
    trainer = _Trainer(spec, cfg, pre, clip_range, seed)
    eval_labels = torch.arange(NUM_CLASSES, device=trainer.device).repeat_interleave(
        cfg.eval_per_class
    )
    eval_kernel = FlowSDE.from_sigmas(time_schedule(cfg.num_steps, cfg.shift), cfg.flow_eta)
    eval_times = time_schedule(cfg.num_steps, cfg.shift)
    keep = torch.arange(len(eval_labels), device=trainer.device) % cfg.eval_per_class < 4
    result = RunResult(
        ratio=ratio or TimestepDiagnostics(), raw_ratio=raw_ratio or TimestepDiagnostics()
    )

    def run_eval(step: int) -> Tensor:
        metrics, images = evaluate(
            trainer.net,
            pre.generator,
            pre.proxy,
            pre.gold,
            digits,
            eval_times,
            eval_labels,
            eval_noise,
            eval_kernel,
        )
        result.evals.append({"step": step, **metrics})
        return images[keep].cpu()

    result.images["start"] = run_eval(0)
    for step in range(1, cfg.steps + 1):
        roll, rewards, adv = trainer.rollout()
        ref = trainer.reference_means(roll)
        record: dict[str, float] = {"step": step, "rollout_proxy": float(rewards.mean())}
        for k in range(cfg.passes):
            out, mean = trainer.loss(roll, adv, ref)
            if k >= 1:
                result.ratio.update(roll.step_index, out)
                with torch.no_grad():
                    raw = trainer.vanilla(
                        advantages=adv,
                        mean=mean.detach(),
                        old_mean=roll.old_means,
                        next_sample=roll.next_states,
                        std=trainer.kernel.std(roll.t, roll.dt),
                        dt=roll.dt,
                    )
                result.raw_ratio.update(roll.step_index, raw)
                if k == 1:
                    record.update({f"pass2/{key}": value for key, value in out.metrics.items()})
                    record["pass2/raw_shift_z"] = raw.metrics["log_ratio/shift_z"]
            trainer.optimizer_step(out.loss)
        result.train.append(record)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            images = run_eval(step)
        if on_iteration is not None:
            on_iteration()
    result.images["end"] = images
    return result
