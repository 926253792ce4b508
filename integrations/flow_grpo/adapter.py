r"""Run a regclip loss inside Flow-GRPO's ``scripts/train_sd3.py`` (SD3.5-M).

Targets ``yifan123/flow_grpo`` commit :data:`FLOW_GRPO_COMMIT` (2025-07-18, the snapshot the
project could fetch; it predates ``train_flux.py``, so Flux is not covered). Four run-time
patches, nothing copied:

1. ``sd3_pipeline_with_logprob.sde_step_with_logprob`` is wrapped so that, during a training
   rollout (``noise_level > 0``), every step's ``prev_sample_mean`` -- the old proposal mean
   mu_old that the guard needs -- goes into a :class:`~integrations.common.TransitionStore`
   keyed by the step's draw.
2. ``train_sd3.compute_log_prob`` is wrapped to keep the training pass's
   ``(log_prob, prev_sample_mean, std_dev_t)`` for the current ``(sample, j)`` (and the
   reference mean of the ``beta > 0`` pass, which runs without grad).
3. ``train_sd3.Accelerator`` becomes a subclass whose ``backward(loss)`` backpropagates the
   regclip loss of that step instead of upstream's. The regclip loss is evaluated on
   ``t = sigma``, ``dt = sigma_next - sigma``, ``s = std_dev_t sqrt(-dt)``, the rollout's
   ``next_latents`` and log-probs, and upstream's advantages; accelerate's gradient
   accumulation scaling applies to it unchanged.
4. ``train_sd3.wandb`` becomes a :class:`~integrations.common.LoggerProxy` that adds the
   ``regclip/*`` metrics to upstream's per-optimizer-step ``wandb.log(info)``. Upstream's
   own ``clipfrac``/``approx_kl``/``loss`` keys still describe the *vanilla* ratio.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from regclip import FlowSDE, GuardedPPOLoss

from ..common import (
    LoggerProxy,
    RegclipOptions,
    UpstreamAdapter,
    build_loss,
    require_attributes,
    require_parameters,
    require_source,
    transition_std,
)

__all__ = ["FLOW_GRPO_COMMIT", "FlowGRPOAdapter", "UpstreamFlowGRPO", "load_upstream"]

FLOW_GRPO_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"
SRC_ENV = "REGCLIP_FLOW_GRPO_SRC"


@dataclass(frozen=True)
class UpstreamFlowGRPO:
    """The imported upstream modules the adapter patches."""

    root: Path
    sde_module: ModuleType
    """``flow_grpo.diffusers_patch.sd3_sde_with_logprob``"""
    pipeline_module: ModuleType
    """``flow_grpo.diffusers_patch.sd3_pipeline_with_logprob``"""
    train_module: ModuleType
    """``scripts/train_sd3.py``, imported as ``flow_grpo_train_sd3``."""


def load_upstream(src: str | Path | None = None) -> UpstreamFlowGRPO:
    """Import a Flow-GRPO checkout (``src``, else ``$REGCLIP_FLOW_GRPO_SRC``, else the
    working directory) and check that it has what the adapter patches."""
    root = Path(src or os.environ.get(SRC_ENV) or os.getcwd()).resolve()
    script = root / "scripts" / "train_sd3.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: run from a flow_grpo checkout, or set --regclip_src / ${SRC_ENV}"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sde_module = importlib.import_module("flow_grpo.diffusers_patch.sd3_sde_with_logprob")
    pipeline_module = importlib.import_module("flow_grpo.diffusers_patch.sd3_pipeline_with_logprob")
    name = "flow_grpo_train_sd3"
    train_module = sys.modules.get(name)
    if train_module is None:
        spec = importlib.util.spec_from_file_location(name, script)
        assert spec is not None and spec.loader is not None
        train_module = importlib.util.module_from_spec(spec)
        sys.modules[name] = train_module
        spec.loader.exec_module(train_module)
    upstream = UpstreamFlowGRPO(root, sde_module, pipeline_module, train_module)
    check_compatible(upstream)
    return upstream


def check_compatible(up: UpstreamFlowGRPO) -> None:
    """Raise :class:`~integrations.common.IncompatibleUpstreamError` unless the functions
    and call sites the adapter relies on look as at :data:`FLOW_GRPO_COMMIT`."""
    commit = FLOW_GRPO_COMMIT
    require_parameters(
        up.sde_module.sde_step_with_logprob,
        ("self", "model_output", "timestep", "sample", "noise_level", "prev_sample", "generator"),
        commit,
    )
    require_source(
        up.sde_module.sde_step_with_logprob,
        ["return prev_sample, log_prob, prev_sample_mean, std_dev_t"],
        commit,
    )
    require_attributes(
        up.pipeline_module, ["sde_step_with_logprob", "pipeline_with_logprob"], commit
    )
    require_source(
        up.pipeline_module.pipeline_with_logprob,
        ["noise_level: float", "sde_step_with_logprob(", "all_latents.append(latents)"],
        commit,
    )
    require_attributes(
        up.train_module,
        ["Accelerator", "wandb", "compute_log_prob", "pipeline_with_logprob", "main"],
        commit,
    )
    require_parameters(
        up.train_module.compute_log_prob,
        ("transformer", "pipeline", "sample", "j", "embeds", "pooled_embeds", "config"),
        commit,
    )
    require_source(
        up.train_module.main,
        [
            "compute_log_prob(transformer, pipeline, sample, j, embeds, pooled_embeds, config)",
            'sample["advantages"][:, j]',
            'sample["log_probs"][:, j]',
            "accelerator.backward(loss)",
            "wandb.log(info, step=global_step)",
            '"next_latents": latents[',
        ],
        commit,
    )


@dataclass
class _TrainStep:
    pipeline: Any
    sample: dict[str, Tensor]
    j: int
    config: Any
    log_prob: Tensor
    mean: Tensor
    std_dev_t: Tensor
    ref_mean: Tensor | None = None


class FlowGRPOAdapter(UpstreamAdapter):
    """Installs the four patches of the module docstring on an :class:`UpstreamFlowGRPO`.

    Use as a context manager or call :meth:`install` / :meth:`uninstall`.
    """

    upstream: UpstreamFlowGRPO

    def __init__(self, upstream: UpstreamFlowGRPO, options: RegclipOptions | None = None) -> None:
        super().__init__(upstream, options)
        self._recording = False
        self._step: _TrainStep | None = None

    # -- install --------------------------------------------------------------------
    def install(self) -> FlowGRPOAdapter:
        up, p = self.upstream, self._patches
        self._originals["step"] = p.set(
            up.pipeline_module, "sde_step_with_logprob", self._recording_step
        )
        self._originals["rollout"] = p.set(up.train_module, "pipeline_with_logprob", self._rollout)
        self._originals["compute_log_prob"] = p.set(
            up.train_module, "compute_log_prob", self._compute_log_prob
        )
        adapter = self
        base = up.train_module.Accelerator

        class RegclipAccelerator(base):  # type: ignore[misc, valid-type]
            """upstream's Accelerator; ``backward`` takes regclip's loss of the step."""

            def backward(self, loss: Tensor, **kwargs: Any) -> Any:
                return super().backward(adapter.replace_loss(loss), **kwargs)

        p.set(up.train_module, "Accelerator", RegclipAccelerator)
        p.set(
            up.train_module,
            "wandb",
            LoggerProxy(
                up.train_module.wandb,
                self.metrics,
                lambda data: "inner_epoch" in data,
                self.options.max_steps,
            ),
        )
        return self

    # -- rollout ----------------------------------------------------------------------
    def _rollout(self, pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        """upstream ``pipeline_with_logprob``; records means when ``noise_level > 0``."""
        if self._trained_since_rollout:
            self.store.clear()
            self._trained_since_rollout = False
        self._recording = float(kwargs.get("noise_level", 0.7)) > 0
        try:
            return self._originals["rollout"](pipeline, *args, **kwargs)
        finally:
            self._recording = False

    def _recording_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._originals["step"](*args, **kwargs)
        if self._recording:
            prev_sample, _, prev_sample_mean, _ = out
            self.store.record(prev_sample, mean=prev_sample_mean.float())
        return out

    # -- training -----------------------------------------------------------------------
    def _compute_log_prob(
        self,
        transformer: Any,
        pipeline: Any,
        sample: dict[str, Tensor],
        j: int,
        embeds: Tensor,
        pooled_embeds: Tensor,
        config: Any,
    ) -> Any:
        out = self._originals["compute_log_prob"](
            transformer, pipeline, sample, j, embeds, pooled_embeds, config
        )
        _, log_prob, prev_sample_mean, std_dev_t = out
        self._trained_since_rollout = True
        if torch.is_grad_enabled():
            self._step = _TrainStep(
                pipeline, sample, j, config, log_prob, prev_sample_mean, std_dev_t
            )
        elif self._step is not None and self._step.sample is sample and self._step.j == j:
            self._step.ref_mean = prev_sample_mean  # the `beta > 0` reference pass
        return out

    def _loss_fn(self, config: Any, sigmas: Tensor) -> GuardedPPOLoss:
        kernel = FlowSDE.from_sigmas(sigmas, eta=float(config.sample.noise_level))
        if self.loss_fn is None:
            self.loss_fn = build_loss(
                self.options,
                sde="flow",
                kernel=kernel,
                upstream_clip_range=float(config.train.clip_range),
                upstream_adv_clip=float(config.train.adv_clip_max),
                kl_coef=float(config.train.beta),
                kl_variance="sigma",
            )
        self.loss_fn.kernel = kernel
        return self.loss_fn

    def replace_loss(self, upstream_loss: Tensor) -> Tensor:
        """regclip's loss for the step whose ``compute_log_prob`` ran last (or
        ``upstream_loss`` unchanged when there is none)."""
        step, self._step = self._step, None
        if step is None:
            return upstream_loss
        sample, j = step.sample, step.j
        scheduler = step.pipeline.scheduler
        timesteps = sample["timesteps"][:, j]
        index = torch.tensor([scheduler.index_for_timestep(t) for t in timesteps])
        sigmas = scheduler.sigmas.to(torch.float32)
        device = step.mean.device
        t = sigmas[index].to(device)
        dt = sigmas[index + 1].to(device) - t
        next_sample = sample["next_latents"][:, j].float()
        old_mean = self.store.lookup(next_sample, ["mean"])["mean"]
        loss_fn = self._loss_fn(step.config, sigmas)
        out = loss_fn(
            advantages=sample["advantages"][:, j],
            mean=step.mean,
            old_mean=old_mean,
            next_sample=next_sample,
            std=transition_std(step.std_dev_t, dt),
            dt=dt,
            t=t,
            log_prob=step.log_prob,
            old_log_prob=sample["log_probs"][:, j],
            ref_mean=step.ref_mean if loss_fn.kl is not None else None,
        )
        self.metrics.add(out, j)
        self.last_output = out
        return out.loss
