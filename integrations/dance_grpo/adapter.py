r"""Run a regclip loss inside DanceGRPO's ``fastvideo/train_grpo_flux.py`` (FLUX.1-dev).

Targets ``XueZeyue/DanceGRPO`` commit :data:`DANCEGRPO_COMMIT` (2025-10-16). Upstream's
``flux_step`` returns ``(prev_sample, pred_original_sample, log_prob)`` and no mean, so the
proposal mean comes from regclip's :class:`regclip.DanceSDE` kernel evaluated on the same
``(latents, model_output, sigma, dsigma)``; ``tests/test_integrations_dance_grpo.py`` proves
it equals upstream's ``prev_sample_mean`` (``flux_step(..., grpo=False)``) and reproduces its
log-probs. Five run-time patches of module globals, nothing copied:

1. ``run_sample_step`` is wrapped to number the rollout rows (upstream samples one row per
   call, in order) and to start a fresh rollout store after training.
2. ``flux_step`` is wrapped: during sampling it stores the kernel mean mu_old, the row and
   upstream's log-prob under the step's draw; in a training pass it keeps the kernel mean
   (with its gradient) for the loss.
3. ``gather_tensor`` (called once per step on the rewards) is wrapped to compute the
   advantages the way ``train_one_step`` does: per contiguous group of ``num_generations``
   with the unbiased std + 1e-8 (``--use_group``), else against the gathered rewards.
4. ``grpo_one_step`` is wrapped to evaluate the regclip loss of the transition and return
   upstream's log-prob through :func:`~integrations.common.inject_gradient`: upstream's
   ``loss.backward()`` then backpropagates ``regclip_loss / (gradient_accumulation_steps *
   train_timesteps)`` -- upstream's own normalization -- while its printed ratio and loss
   stay those of the vanilla formula. Upstream passes each call a slice of its batch's
   tensors (``sample["next_latents"][:, _]`` and ``perms[i][_]``, views of the shuffled
   ``samples["next_latents"]`` and of ``perms``), so the adapter reads the whole batch's
   store keys and sigma indices to the host once, on its first call (:class:`_BatchCopy`).
5. ``wandb`` becomes a :class:`~integrations.common.LoggerProxy` that adds ``regclip/*``
   metrics to the per-step ``wandb.log({"train_loss": ...})`` on rank 0.

The torchrun/FSDP launch is untouched: the gradient flows through the FSDP-wrapped
transformer's own forward.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from regclip import DanceSDE, GuardedPPOLoss

from ..common import (
    LoggerProxy,
    RegclipOptions,
    SeenTensor,
    UpstreamAdapter,
    build_loss,
    inject_gradient,
    require_attributes,
    require_parameters,
    require_source,
)

__all__ = [
    "DANCEGRPO_COMMIT",
    "DanceGRPOAdapter",
    "UpstreamDanceGRPO",
    "load_upstream",
    "train_timesteps",
]

DANCEGRPO_COMMIT = "15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344"
SRC_ENV = "REGCLIP_DANCEGRPO_SRC"
MODULE = "fastvideo.train_grpo_flux"


@dataclass(frozen=True)
class UpstreamDanceGRPO:
    root: Path
    train_module: ModuleType
    """``fastvideo.train_grpo_flux``"""


def load_upstream(src: str | Path | None = None) -> UpstreamDanceGRPO:
    """Import a DanceGRPO checkout (``src``, else ``$REGCLIP_DANCEGRPO_SRC``, else the working
    directory) and check that it has what the adapter patches."""
    root = Path(src or os.environ.get(SRC_ENV) or os.getcwd()).resolve()
    if not (root / "fastvideo" / "train_grpo_flux.py").is_file():
        raise FileNotFoundError(
            f"{root}/fastvideo/train_grpo_flux.py not found: run from a DanceGRPO checkout, "
            f"or set --regclip_src / ${SRC_ENV}"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    upstream = UpstreamDanceGRPO(root, importlib.import_module(MODULE))
    check_compatible(upstream)
    return upstream


def check_compatible(up: UpstreamDanceGRPO) -> None:
    """Raise :class:`~integrations.common.IncompatibleUpstreamError` unless the functions and
    call sites the adapter relies on look as at :data:`DANCEGRPO_COMMIT`."""
    m, commit = up.train_module, DANCEGRPO_COMMIT
    require_attributes(
        m,
        [
            "flux_step",
            "run_sample_step",
            "grpo_one_step",
            "gather_tensor",
            "train_one_step",
            "sample_reference_model",
            "wandb",
            "main",
        ],
        commit,
    )
    require_parameters(
        m.flux_step,
        ("model_output", "latents", "eta", "sigmas", "index", "prev_sample", "grpo", "sde_solver"),
        commit,
    )
    require_source(
        m.flux_step,
        [
            "std_dev_t = eta * math.sqrt(delta_t)",
            "return prev_sample, pred_original_sample, log_prob",
        ],
        commit,
    )
    require_parameters(
        m.grpo_one_step,
        (
            "args",
            "latents",
            "pre_latents",
            "encoder_hidden_states",
            "pooled_prompt_embeds",
            "text_ids",
            "image_ids",
            "transformer",
            "timesteps",
            "i",
            "sigma_schedule",
        ),
        commit,
    )
    require_parameters(m.run_sample_step, ("args", "z"), commit)
    require_source(
        m.train_one_step,
        [
            'gather_tensor(samples["rewards"])',
            "group_rewards.std() + 1e-8",
            'ratio = torch.exp(new_log_probs - sample["log_probs"][:,_])',
            "/ (args.gradient_accumulation_steps * train_timesteps)",
            "loss.backward()",
            'int(len(samples["timesteps"][0])*args.timestep_fraction)',
        ],
        commit,
    )
    require_source(m.sample_reference_model, ["run_sample_step(", "batch_size = 1"], commit)


def train_timesteps(args: Any) -> int:
    """``train_one_step``'s number of trained steps per sample: the rollout keeps
    ``sampling_steps - 1`` transitions (it drops the last) times ``timestep_fraction``."""
    return int((args.sampling_steps - 1) * args.timestep_fraction)


def dance_advantages(args: Any, rewards: Tensor, gathered: Tensor) -> Tensor:
    """(N,) the advantages ``train_one_step`` gives this rank's ``rewards``:
    ``(r - mean) / (std + 1e-8)`` with torch's unbiased std, per contiguous block of
    ``num_generations`` rows (``--use_group``) or over the gathered rewards. Evaluated in
    the same order of operations as upstream, so the values are bit-identical (the
    library's :func:`regclip.group_advantages` can differ from them by one ulp)."""
    rewards = rewards.float()
    if not args.use_group:
        gathered = gathered.float()
        return (rewards - gathered.mean()) / (gathered.std() + 1e-8)
    groups = rewards.split(args.num_generations)
    return torch.cat([(g - g.mean()) / (g.std() + 1e-8) for g in groups])


@dataclass
class _TrainMean:
    mean: Tensor
    t: float
    dt: float


def _rows_of_base(view: Tensor) -> tuple[Tensor, torch.Size, int] | None:
    """``(base, row_shape, start)`` when ``view`` is rows ``start, start + 1, ...`` of its
    base tensor seen as rows shaped like ``view[0]`` (a 0-d ``view``: element ``start``),
    else ``None``. It is when both are contiguous, of one dtype, and the view starts on a
    row: a contiguous view covers the elements from its storage offset on, in order, so
    it equals ``base.reshape(-1, *row_shape)[start : start + len(view)]`` exactly."""
    base = view._base
    if base is None or base.dtype != view.dtype:
        return None
    if not (base.is_contiguous() and view.is_contiguous()):
        return None
    row_shape = view.shape[1:] if view.ndim else torch.Size()
    row = row_shape.numel()
    offset = view.storage_offset() - base.storage_offset()
    if row == 0 or offset < 0 or offset % row or base.numel() % row:
        return None
    return base, row_shape, offset // row


def _to_host(tensor: Tensor) -> Tensor:
    return tensor.cpu()


class _BatchCopy:
    """A host copy of the tensor that upstream slices each call's input from (at 15cc71d
    one per ``train_one_step``: its shuffled ``samples`` field, or ``perms``), made on the
    first call that sees it: ``read`` of the base's rows (one device-to-host transfer). A
    later call whose input is a slice of the same base, unchanged since (its ``_version``)
    and cut into rows of the same shape, reads nothing. The base is held weakly (a freed
    tensor never matches a new one)."""

    def __init__(self, read: Callable[[Tensor], Tensor]) -> None:
        self._read = read
        self._source: SeenTensor | None = None
        self._row_shape: torch.Size | None = None
        self._rows: Tensor | None = None

    def __call__(self, view: Tensor) -> Tensor | None:
        """The host copy of ``view``'s rows (of ``view`` itself when 0-d), or ``None``
        when ``view`` is not a run of rows of a base tensor (:func:`_rows_of_base`)."""
        found = _rows_of_base(view)
        if found is None:
            return None
        base, row_shape, start = found
        fresh = self._source is not None and self._source.matches(base)
        if self._rows is None or not fresh or self._row_shape != row_shape:
            self._rows = self._read(base.reshape(-1, *row_shape))
            self._source, self._row_shape = SeenTensor.of(base), row_shape
        return self._rows[start] if view.ndim == 0 else self._rows[start : start + len(view)]


class DanceGRPOAdapter(UpstreamAdapter):
    """Installs the five patches of the module docstring on an :class:`UpstreamDanceGRPO`."""

    upstream: UpstreamDanceGRPO

    def __init__(self, upstream: UpstreamDanceGRPO, options: RegclipOptions | None = None) -> None:
        super().__init__(upstream, options)
        self.advantages: Tensor | None = None
        self._flux_signature = inspect.signature(upstream.train_module.flux_step)
        self._rows: Tensor | None = None
        self._next_row = 0
        self._train_mean: _TrainMean | None = None
        self._args: Any = None
        self._draw_heads = _BatchCopy(self.store.heads)  # store keys of the batch's draws
        self._sigma_indices = _BatchCopy(_to_host)  # the batch's `i`s (`perms`)
        self._index: tuple[Any, int] | None = None  # the call's `i` and its value

    def install(self) -> DanceGRPOAdapter:
        m, p = self.upstream.train_module, self._patches
        for name, wrapper in [
            ("run_sample_step", self._run_sample_step),
            ("flux_step", self._flux_step),
            ("gather_tensor", self._gather_tensor),
            ("grpo_one_step", self._grpo_one_step),
        ]:
            self._originals[name] = p.set(m, name, wrapper)
        p.set(
            m,
            "wandb",
            LoggerProxy(m.wandb, self.metrics, lambda d: "train_loss" in d, self.options.max_steps),
        )
        return self

    # -- rollout ----------------------------------------------------------------------
    def _run_sample_step(self, args: Any, z: Tensor, *rest: Any, **kwargs: Any) -> Any:
        if self._trained_since_rollout:
            self.store.clear()
            self._next_row = 0
            self._trained_since_rollout = False
        self._args = args
        batch = z.shape[0]
        self._rows = torch.arange(self._next_row, self._next_row + batch)
        self._next_row += batch
        try:
            return self._originals["run_sample_step"](args, z, *rest, **kwargs)
        finally:
            self._rows = None

    def _flux_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._originals["flux_step"](*args, **kwargs)
        call = self._flux_signature.bind(*args, **kwargs).arguments
        if not (call.get("grpo") and call.get("sde_solver")):
            return out
        sigmas, index = call["sigmas"], call["index"]
        known = self._index  # a training call's `i`, read once per `train_one_step`
        index = known[1] if known is not None and index is known[0] else int(index)
        t = float(sigmas[index])
        dt = float(sigmas[index + 1]) - t
        kernel = DanceSDE(float(call["eta"]))
        mean, _ = kernel.evaluate(call["latents"], call["model_output"], t, dt)
        if call.get("prev_sample") is None and self._rows is not None:
            prev_sample, _, log_prob = out
            self.store.record(
                prev_sample, mean=mean, row=self._rows.to(mean.device), log_prob=log_prob
            )
        elif call.get("prev_sample") is not None and torch.is_grad_enabled():
            self._train_mean = _TrainMean(mean, t, dt)
        return out

    def _gather_tensor(self, tensor: Tensor) -> Tensor:
        gathered = self._originals["gather_tensor"](tensor)
        if self._args is not None:
            self.advantages = dance_advantages(self._args, tensor, gathered)
        return gathered

    # -- training -----------------------------------------------------------------------
    def _loss_fn(self, args: Any) -> GuardedPPOLoss:
        if self.loss_fn is None:
            self.loss_fn = build_loss(
                self.options,
                sde="dance",
                kernel=DanceSDE(float(args.eta)),
                upstream_clip_range=float(args.clip_range),
                upstream_adv_clip=float(args.adv_clip_max),
            )
        return self.loss_fn

    def _grpo_one_step(self, args: Any, latents: Tensor, pre_latents: Tensor, *rest: Any) -> Tensor:
        """Host reads, all before upstream's forward: on the first call of a
        ``train_one_step``, the store keys of all its samples' draws, all its sigma indices
        and, the first time after a rollout, the keys of the recorded draws (one transfer
        each); none on its other calls. Inputs that are not slices of such a tensor
        (:func:`_rows_of_base`) cost two transfers on every call instead: their keys and
        their sigma index. (The loss's value checks, ``--regclip_validate``, read on their
        own.)"""
        index = rest[-2]  # `i`, the sigma index of this transition
        host_index = self._sigma_indices(index) if isinstance(index, Tensor) else None
        step_index = int(index if host_index is None else host_index)
        next_sample = pre_latents.float()
        old = self.store.lookup(
            next_sample, ["mean", "row", "log_prob"], heads=self._draw_heads(pre_latents)
        )
        self._train_mean = None
        self._index = (index, step_index)
        try:
            log_prob = self._originals["grpo_one_step"](args, latents, pre_latents, *rest)
        finally:
            self._index = None
        self._trained_since_rollout = True
        current, self._train_mean = self._train_mean, None
        if current is None:
            raise RuntimeError("grpo_one_step ran without a flux_step(grpo=True, sde_solver=True)")
        if self.advantages is None:
            raise RuntimeError("no advantages: gather_tensor(rewards) was not called this step")
        batch = next_sample.shape[0]
        device = next_sample.device
        t = torch.full((batch,), current.t, device=device)
        dt = torch.full((batch,), current.dt, device=device)
        loss_fn = self.validated(self._loss_fn(args), step_index)
        out = loss_fn(
            advantages=self.advantages.to(device)[old["row"]],
            mean=current.mean,
            old_mean=old["mean"],
            next_sample=next_sample,
            std=DanceSDE(float(args.eta)).std(t, dt),
            dt=dt,
            t=t,
            log_prob=log_prob,
            old_log_prob=old["log_prob"],
        )
        self.metrics.add(out, step_index)
        self.last_output = out
        scale = 1.0 / (args.gradient_accumulation_steps * train_timesteps(args))
        return inject_gradient(log_prob, out.loss * scale)
