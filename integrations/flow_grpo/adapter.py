r"""Run a regclip loss inside Flow-GRPO's training scripts.

Supported checkouts (:data:`SUPPORTED`): ``zhtmike/flow_grpo`` commit 9745241 (2025-11-04:
``train_sd3.py``, ``train_sd3_fast.py``, ``train_flux.py``, ``train_flux_fast.py``,
``train_flux_kontext.py``, ``train_qwenimage.py``, ``train_qwenimage_edit.py``,
``train_wan2_1.py``) and ``yifan123/flow_grpo`` commit ac4c86e (2025-07-18,
``train_sd3.py`` only). A checkout whose script differs from those commits is refused with
the list (set ``REGCLIP_ALLOW_UNTESTED_UPSTREAM=1`` to run it anyway when the structural
checks of :func:`check_compatible` pass). Run-time patches, nothing copied:

1. The rollout's SDE step (``sde_step_with_logprob`` as the script's sampling pipeline
   module calls it) is wrapped so that every stochastic step that draws its own sample
   (``prev_sample=None``, a non-zero noise level) puts ``prev_sample_mean`` -- the old
   proposal mean mu_old the guard needs -- into a
   :class:`~integrations.common.TransitionStore` keyed by the step's draw. The Flux, Qwen-Image
   and Wan pipelines compute this mean and discard it; the wrapper keeps it. The fast
   scripts' SDE window and CPS steps go through the same function (ODE steps outside the
   window have noise level 0 and are not recorded).
2. The script's ``compute_log_prob`` is wrapped to keep the training pass's
   ``(log_prob, prev_sample_mean, std_dev_t)`` for the current ``(sample, j)`` (and the
   reference mean of the ``beta > 0`` pass, which runs without grad).
3. The step's loss becomes regclip's, evaluated on ``t = sigma``, ``dt = sigma_next - sigma``,
   the transition std (``std_dev_t sqrt(-dt)`` for Flow-SDE and Wan's SDE, ``std_dev_t`` for
   CPS), the rollout's ``next_latents`` and log-probs, and upstream's advantages.
   Accelerate scripts: ``Accelerator`` becomes a subclass whose ``backward(loss)``
   backpropagates regclip's loss instead (accelerate's accumulation scaling applies
   unchanged). Qwen-Image scripts (FSDP, plain ``loss.backward()``): ``compute_log_prob``
   returns a ``log_prob`` that carries regclip's policy loss divided by the script's
   ``gradient_accumulation_steps`` into whatever upstream builds from it
   (:func:`~integrations.common.inject_gradient`); upstream's own KL term keeps its
   gradient there.
4. The per-optimizer-step log (``wandb.log(info)``, or ``accelerator.log(info)`` in
   ``train_wan2_1.py``) gets the ``regclip/*`` metrics, per-step clip fractions included.
   Upstream's own ``clipfrac``/``approx_kl``/``loss`` keys still describe its vanilla ratio.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor

from regclip import CPS, FlowSDE, GuardedPPOLoss, TransitionKernel

from ..common import (
    IncompatibleUpstreamError,
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
    "FLOW_GRPO_COMMIT",
    "FLOW_GRPO_COMMITS",
    "FLOW_GRPO_COMMIT_9745241",
    "SCRIPTS",
    "SUPPORTED",
    "FlowGRPOAdapter",
    "ScriptSpec",
    "UpstreamFlowGRPO",
    "WanSDE",
    "identify_commit",
    "import_script",
    "load_upstream",
]

FLOW_GRPO_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"
"""yifan123/flow_grpo, the first commit the adapter was written for (``train_sd3.py``)."""
FLOW_GRPO_COMMIT_9745241 = "9745241cf1101407e9b518dd4f10498092150522"
FLOW_GRPO_COMMITS = {
    FLOW_GRPO_COMMIT: "yifan123/flow_grpo (2025-07-18)",
    FLOW_GRPO_COMMIT_9745241: "zhtmike/flow_grpo (2025-11-04, with PR #175)",
}
SRC_ENV = "REGCLIP_FLOW_GRPO_SRC"
ALLOW_ENV = "REGCLIP_ALLOW_UNTESTED_UPSTREAM"

# sha256 (first 16 hex digits) of each supported script at each commit
SUPPORTED: dict[str, dict[str, str]] = {
    FLOW_GRPO_COMMIT: {"train_sd3": "d45e92160265a466"},
    FLOW_GRPO_COMMIT_9745241: {
        "train_sd3": "b09c084e6edf7457",
        "train_sd3_fast": "9ced4a07d093922e",
        "train_flux": "be9bbd9ab3658330",
        "train_flux_fast": "d27275be5f31d8ff",
        "train_flux_kontext": "04fd42402c85514b",
        "train_qwenimage": "9b28783a2de0844d",
        "train_qwenimage_edit": "ca49ad2b22226dde",
        "train_wan2_1": "0326761b01c40945",
    },
}

_PATCH = "flow_grpo.diffusers_patch."
_SD3_PARAMS = ("transformer", "pipeline", "sample", "j", "embeds", "pooled_embeds", "config")
_FLUX_PARAMS = ("transformer", "pipeline", "sample", "j", "config")
_QWEN_PARAMS = ("transformer", "pipeline", "sample", "j", "config", "rank")
_WAN_PARAMS = ("transformer", "pipeline", "sample", "j", "embeds", "negative_embeds", "config")


@dataclass(frozen=True)
class ScriptSpec:
    """What the adapter needs to know about one upstream training script."""

    name: str
    """``scripts/<name>.py``"""
    pipeline_module: str
    """The module whose ``sde_step_with_logprob`` the rollout calls."""
    rollout: str
    """The training module's name for the sampling function."""
    log_prob_params: tuple[str, ...]
    """Leading parameters of the script's ``compute_log_prob``."""
    loop_snippets: tuple[str, ...]
    """Source fragments of ``main`` the patches rely on."""
    backward: Literal["accelerator", "inject"] = "accelerator"
    logger: Literal["wandb", "accelerator"] = "wandb"
    sde: Literal["flow_grpo", "wan"] = "flow_grpo"
    """``flow_grpo``: the shared ``sd3_sde_with_logprob`` (Flow-SDE, or CPS by
    ``config.sample.sde_type``); ``wan``: ``wan_pipeline_with_logprob``'s own step."""
    kl_variance: Literal["transition", "sigma"] = "sigma"
    """What upstream's KL divides by: sigma_t^2 (SD3, Flux, Qwen) or s_t^2 (Wan)."""

    @property
    def sde_module(self) -> str:
        if self.sde == "wan":
            return _PATCH + "wan_pipeline_with_logprob"
        return _PATCH + "sd3_sde_with_logprob"


def _loop(call: str, backward: str = "accelerator.backward(loss)") -> tuple[str, ...]:
    return (call, 'sample["advantages"][:, j]', 'sample["log_probs"][:, j]', backward)


_SD3_CALL = "compute_log_prob(transformer, pipeline, sample, j, embeds, pooled_embeds, config)"
_FLUX_CALL = "compute_log_prob(transformer, pipeline, sample, j, config)"
_QWEN_CALL = "compute_log_prob(transformer, pipeline, sample, j, config, rank)"
_WAN_CALL = "compute_log_prob(transformer, pipeline, sample, j, embeds, negative_embeds, config)"

SCRIPTS: dict[str, ScriptSpec] = {
    spec.name: spec
    for spec in (
        ScriptSpec(
            "train_sd3",
            _PATCH + "sd3_pipeline_with_logprob",
            "pipeline_with_logprob",
            _SD3_PARAMS,
            _loop(_SD3_CALL),
        ),
        ScriptSpec(
            "train_sd3_fast",
            _PATCH + "sd3_pipeline_with_logprob_fast",
            "pipeline_with_logprob",
            _SD3_PARAMS,
            _loop(_SD3_CALL),
        ),
        ScriptSpec(
            "train_flux",
            _PATCH + "flux_pipeline_with_logprob",
            "pipeline_with_logprob",
            _FLUX_PARAMS,
            _loop(_FLUX_CALL),
        ),
        ScriptSpec(
            "train_flux_fast",
            _PATCH + "flux_pipeline_with_logprob_fast",
            "pipeline_with_logprob",
            _FLUX_PARAMS,
            _loop(_FLUX_CALL),
        ),
        ScriptSpec(
            "train_flux_kontext",
            _PATCH + "flux_kontext_pipeline_with_logprob",
            "pipeline_with_logprob",
            _FLUX_PARAMS,
            _loop(_FLUX_CALL),
        ),
        ScriptSpec(
            "train_qwenimage",
            _PATCH + "qwenimage_pipeline_with_logprob",
            "pipeline_with_logprob",
            _QWEN_PARAMS,
            _loop(_QWEN_CALL, "loss.backward()"),
            backward="inject",
        ),
        ScriptSpec(
            "train_qwenimage_edit",
            _PATCH + "qwenimage_edit_pipeline_with_logprob",
            "pipeline_with_logprob",
            _QWEN_PARAMS,
            _loop(_QWEN_CALL, "loss.backward()"),
            backward="inject",
        ),
        ScriptSpec(
            "train_wan2_1",
            _PATCH + "wan_pipeline_with_logprob",
            "wan_pipeline_with_logprob",
            _WAN_PARAMS,
            _loop(_WAN_CALL),
            logger="accelerator",
            sde="wan",
            kl_variance="transition",
        ),
    )
}


@dataclass(frozen=True)
class UpstreamFlowGRPO:
    """The imported upstream modules the adapter patches."""

    root: Path
    sde_module: ModuleType
    """The module defining the SDE step (``sd3_sde_with_logprob``, or Wan's pipeline)."""
    pipeline_module: ModuleType
    """The sampling pipeline module the script's rollout calls."""
    train_module: ModuleType
    """``scripts/<script>.py``, imported as ``flow_grpo_<script>``."""
    spec: ScriptSpec = SCRIPTS["train_sd3"]
    commit: str | None = None
    """The supported commit the script's contents match (``None``: untested contents)."""

    @property
    def script_path(self) -> str:
        return f"scripts/{self.spec.name}.py"


def _script_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def identify_commit(root: Path, script: str) -> str | None:
    """The supported commit whose ``scripts/<script>.py`` has these exact contents."""
    digest = _script_hash(root / "scripts" / f"{script}.py")
    for commit, scripts in SUPPORTED.items():
        if scripts.get(script) == digest:
            return commit
    return None


def _supported_text() -> str:
    return "; ".join(
        f"{commit[:7]} ({FLOW_GRPO_COMMITS[commit]}): {', '.join(sorted(scripts))}"
        for commit, scripts in SUPPORTED.items()
    )


def import_script(root: Path, script: str) -> ModuleType:
    """Import ``<root>/scripts/<script>.py`` as ``flow_grpo_<script>`` (once)."""
    name = f"flow_grpo_{script}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, root / "scripts" / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def load_upstream(src: str | Path | None = None, script: str = "train_sd3") -> UpstreamFlowGRPO:
    """Import a Flow-GRPO checkout (``src``, else ``$REGCLIP_FLOW_GRPO_SRC``, else the
    working directory) and its ``scripts/<script>.py``, and check that the adapter supports
    them (module docstring)."""
    if script not in SCRIPTS:
        raise ValueError(
            f"--regclip_script {script!r} is not supported; choose one of {sorted(SCRIPTS)}"
        )
    root = Path(src or os.environ.get(SRC_ENV) or os.getcwd()).resolve()
    path = root / "scripts" / f"{script}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run from a flow_grpo checkout, or set --regclip_src / ${SRC_ENV}"
        )
    commit = identify_commit(root, script)
    if commit is None:
        message = (
            f"{path} matches no Flow-GRPO commit the adapter was tested against. "
            f"Supported: {_supported_text()}. Check out one of those commits"
        )
        if os.environ.get(ALLOW_ENV) != "1":
            raise IncompatibleUpstreamError(
                f"{message}, or set {ALLOW_ENV}=1 to run on the structural checks alone."
            )
        warnings.warn(f"{message}; running because {ALLOW_ENV}=1.", stacklevel=2)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = SCRIPTS[script]
    upstream = UpstreamFlowGRPO(
        root,
        importlib.import_module(spec.sde_module),
        importlib.import_module(spec.pipeline_module),
        import_script(root, script),
        spec,
        commit,
    )
    check_compatible(upstream)
    return upstream


def check_compatible(up: UpstreamFlowGRPO) -> None:
    """Raise :class:`~integrations.common.IncompatibleUpstreamError` unless the functions
    and call sites the adapter relies on look as at the supported commits."""
    commit = up.commit or " or ".join(c[:7] for c in SUPPORTED)
    if up.spec.sde == "wan":
        step_params: tuple[str, ...] = ("self", "model_output", "timestep", "sample", "prev_sample")
        returns = "return prev_sample, log_prob, prev_sample_mean, std_dev_t"
    else:
        step_params = ("self", "model_output", "timestep", "sample", "noise_level", "prev_sample")
        returns = "return prev_sample, log_prob, prev_sample_mean, std_dev_t"
    require_parameters(up.sde_module.sde_step_with_logprob, step_params, commit)
    require_source(up.sde_module.sde_step_with_logprob, [returns], commit)
    require_attributes(up.pipeline_module, ["sde_step_with_logprob"], commit)
    require_attributes(
        up.train_module, [up.spec.rollout, "compute_log_prob", "wandb", "main"], commit
    )
    require_source(
        getattr(up.train_module, up.spec.rollout),
        ["sde_step_with_logprob(", "all_latents.append(latents)"],
        commit,
    )
    if up.spec.backward == "accelerator":
        require_attributes(up.train_module, ["Accelerator"], commit)
    require_parameters(up.train_module.compute_log_prob, up.spec.log_prob_params, commit)
    require_source(up.train_module.main, up.spec.loop_snippets, commit)


class WanSDE(TransitionKernel):
    r"""The SDE of Flow-GRPO's ``wan_pipeline_with_logprob``: ``sigma_t = sigma_min +
    (sigma_max - sigma_min) t`` with the schedule's ``sigmas[1]`` and ``sigmas[-1]``, the
    Flow-SDE mean ``x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt`` and
    std ``sigma_t sqrt(-dt)``."""

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    @classmethod
    def from_sigmas(cls, sigmas: Tensor) -> WanSDE:
        return cls(float(sigmas[-1]), float(sigmas[1]))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min + (self.sigma_max - self.sigma_min) * t

    def std(self, t: Tensor, dt: Tensor) -> Tensor:
        return self.sigma(t) * torch.sqrt(-dt)

    def mean(self, sample: Tensor, velocity: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (sample.ndim - 1)
        sig2, t_, dt_ = (self.sigma(t) ** 2).view(shape), t.view(shape), dt.view(shape)
        return (
            sample * (1 + sig2 / (2 * t_) * dt_) + velocity * (1 + sig2 * (1 - t_) / (2 * t_)) * dt_
        )

    def velocity_slope(self, t: Tensor, dt: Tensor) -> Tensor:
        return (1 + self.sigma(t) ** 2 * (1 - t) / (2 * t)) * dt


def _kernel_key(kernel: TransitionKernel) -> tuple[Any, ...]:
    """What makes two kernels of :meth:`FlowGRPOAdapter._kernel` the same: class and
    scalar settings (eta, the schedule's sigmas it keeps)."""
    settings = sorted(
        (k, v)
        for k, v in vars(kernel).items()
        if k != "training" and (v is None or isinstance(v, (bool, int, float, str)))
    )
    return (type(kernel), *settings)


@dataclass
class _TrainStep:
    pipeline: Any
    sample: dict[str, Tensor]
    j: int
    config: Any
    log_prob: Tensor
    mean: Tensor
    std_dev_t: Tensor
    extra: tuple[Any, ...]
    ref_mean: Tensor | None = None


@dataclass
class _BatchSchedule:
    """One training batch of upstream's samples, read to the host once for all its steps
    ``j`` (three small copies back to back on the batch's first step, where upstream's own
    step has just waited for the device, instead of several waits per loss call): every
    transition's t and dt on the device, the store keys of its draws, and the loss for its
    schedule (so its steps build no kernel). Identified by the sample's ``next_latents`` and
    ``timesteps`` tensors and the scheduler's ``timesteps`` and ``sigmas``, held weakly (a
    freed tensor never matches a new one), by their versions (one written in place is read
    again), and by the run's config object. The loss is looked up
    on the batch's first step: a kernel setting (``sample.noise_level``, ``sde_type``)
    changed in place during a batch applies from the next one; the loss's other settings
    (``train.clip_range``, ``beta``, ``adv_clip_max``) are read when a kernel's loss is
    first built, as :meth:`FlowGRPOAdapter._loss_fn` does."""

    sources: tuple[SeenTensor, ...]  # the tensors of :meth:`identity`
    t: Tensor  # (B, T) float32, device
    dt: Tensor  # (B, T) float32, device
    heads: Tensor  # (B, T, key_size) float64, host
    config: Any  # upstream's run config the loss was built from (compared by identity)
    loss_fn: GuardedPPOLoss

    @staticmethod
    def identity(sample: dict[str, Tensor], scheduler: Any) -> tuple[Tensor, ...]:
        return sample["next_latents"], sample["timesteps"], scheduler.timesteps, scheduler.sigmas

    def is_for(self, sample: dict[str, Tensor], scheduler: Any, config: Any) -> bool:
        now = self.identity(sample, scheduler)
        return self.config is config and all(
            seen.matches(tensor) for seen, tensor in zip(self.sources, now, strict=True)
        )


class _Forward:
    """A logger whose ``log`` is a given function (for ``accelerator.log``)."""

    def __init__(self, log: Any) -> None:
        self.log = log


class FlowGRPOAdapter(UpstreamAdapter):
    """Installs the patches of the module docstring on an :class:`UpstreamFlowGRPO`.

    Use as a context manager or call :meth:`install` / :meth:`uninstall`.
    """

    upstream: UpstreamFlowGRPO

    def __init__(self, upstream: UpstreamFlowGRPO, options: RegclipOptions | None = None) -> None:
        super().__init__(upstream, options)
        self._recording = False
        self._step: _TrainStep | None = None
        self._step_signature = inspect.signature(upstream.sde_module.sde_step_with_logprob)
        self._log_signature = inspect.signature(upstream.train_module.compute_log_prob)
        self.logger: LoggerProxy | None = None
        self._loss_kernel_key: tuple[Any, ...] | None = None
        self._batch: _BatchSchedule | None = None

    @property
    def spec(self) -> ScriptSpec:
        return self.upstream.spec

    # -- install --------------------------------------------------------------------
    def install(self) -> FlowGRPOAdapter:
        up, p, spec = self.upstream, self._patches, self.upstream.spec
        self._originals["step"] = p.set(
            up.pipeline_module, "sde_step_with_logprob", self._recording_step
        )
        self._originals["rollout"] = p.set(up.train_module, spec.rollout, self._rollout)
        self._originals["compute_log_prob"] = p.set(
            up.train_module, "compute_log_prob", self._compute_log_prob
        )
        is_train_log = lambda data: "inner_epoch" in data  # noqa: E731
        adapter = self
        if spec.backward == "accelerator":
            base = up.train_module.Accelerator
            proxy = LoggerProxy(_Forward(None), self.metrics, is_train_log, self.options.max_steps)

            class RegclipAccelerator(base):  # type: ignore[misc, valid-type]
                """upstream's Accelerator; ``backward`` takes regclip's loss of the step, and
                ``log`` adds regclip's metrics to the per-step training log."""

                def backward(self, loss: Tensor, **kwargs: Any) -> Any:
                    return super().backward(adapter.replace_loss(loss), **kwargs)

                def log(self, values: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                    proxy._logger = _Forward(super().log)
                    return proxy.log(values, *args, **kwargs)

            p.set(up.train_module, "Accelerator", RegclipAccelerator)
        if spec.logger == "wandb":
            self.logger = LoggerProxy(
                up.train_module.wandb, self.metrics, is_train_log, self.options.max_steps
            )
            p.set(up.train_module, "wandb", self.logger)
        return self

    # -- rollout ----------------------------------------------------------------------
    def _rollout(self, pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        """upstream's sampling function; its stochastic steps are recorded."""
        if self._trained_since_rollout:
            self.store.clear()
            self._trained_since_rollout = False
        self._recording = True
        try:
            return self._originals["rollout"](pipeline, *args, **kwargs)
        finally:
            self._recording = False

    def _recording_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._originals["step"](*args, **kwargs)
        if self._recording:
            bound = self._step_signature.bind(*args, **kwargs)
            bound.apply_defaults()
            call = bound.arguments
            drew = call.get("prev_sample") is None and not call.get("determistic", False)
            if drew and float(call.get("noise_level", 1.0)) > 0:
                self.store.record(out[0], mean=out[2].float())
        return out

    # -- training -----------------------------------------------------------------------
    def _compute_log_prob(self, *args: Any, **kwargs: Any) -> Any:
        out = self._originals["compute_log_prob"](*args, **kwargs)
        call = self._log_signature.bind(*args, **kwargs).arguments
        sample, j, config = call["sample"], call["j"], call["config"]
        _, log_prob, prev_sample_mean, std_dev_t, *extra = out
        self._trained_since_rollout = True
        if torch.is_grad_enabled():
            self._step = _TrainStep(
                call["pipeline"],
                sample,
                j,
                config,
                log_prob,
                prev_sample_mean,
                std_dev_t,
                tuple(extra),
            )
            if self.spec.backward == "inject":
                loss = self.replace_loss(None)
                assert loss is not None
                frame = inspect.currentframe()
                caller = frame.f_back if frame is not None else None
                steps = caller.f_locals.get("gradient_accumulation_steps") if caller else None
                if steps is None:
                    raise IncompatibleUpstreamError(
                        f"{self.spec.name}: compute_log_prob's caller has no "
                        "`gradient_accumulation_steps`; the adapter divides regclip's loss by "
                        f"it as upstream does. Supported: {_supported_text()}."
                    )
                return (out[0], inject_gradient(log_prob, loss / steps), *out[2:])
        elif self._step is not None and self._step.sample is sample and self._step.j == j:
            self._step.ref_mean = prev_sample_mean  # the `beta > 0` reference pass
        return out

    def _kernel(self, config: Any, sigmas: Tensor) -> tuple[str, TransitionKernel]:
        if self.spec.sde == "wan":
            return "flow", WanSDE.from_sigmas(sigmas)
        sde_type = getattr(config.sample, "sde_type", "sde")
        eta = float(config.sample.noise_level)
        if sde_type == "cps":
            return "cps", CPS(eta)
        if sde_type != "sde":
            raise IncompatibleUpstreamError(f"config.sample.sde_type {sde_type!r} is unknown")
        return "flow", FlowSDE.from_sigmas(sigmas, eta=eta)

    def _loss_fn(self, config: Any, sigmas: Tensor) -> GuardedPPOLoss:
        sde, kernel = self._kernel(config, sigmas)
        key = _kernel_key(kernel)
        if self.loss_fn is None or key != self._loss_kernel_key:
            # built once per kernel (the schedule's sigmas): a new schedule builds a new
            # loss rather than changing the kernel of a built one
            kl_coef = float(config.train.beta)
            if self.spec.backward == "inject":
                kl_coef = 0.0  # upstream's own KL term keeps its gradient (module docstring)
            loss_fn = build_loss(
                self.options,
                sde="cps" if sde == "cps" else "flow",
                kernel=kernel,
                upstream_clip_range=float(config.train.clip_range),
                upstream_adv_clip=float(config.train.adv_clip_max),
                kl_coef=kl_coef,
                kl_variance=self.spec.kl_variance,
            )
            normalizer = loss_fn.normalizer
            if sde == "cps" and normalizer.debias and normalizer.source == "log_prob":
                raise SystemExit(
                    "CPS log-probs carry no 1/(2 s^2) (upstream's convention): the guard "
                    "presets need --regclip_ratio_source auto or closed_form with "
                    "sde_type='cps'"
                )
            self.loss_fn, self._loss_kernel_key = loss_fn, key
        return self.loss_fn

    def _transition_std(self, step: _TrainStep, dt: Tensor) -> Tensor:
        batch = step.std_dev_t.reshape(step.std_dev_t.shape[0], -1)[:, 0].float()
        if self.spec.sde == "wan":  # compute_log_prob returns sigma_t and sqrt(-dt)
            return batch * step.extra[0].reshape(step.extra[0].shape[0], -1)[:, 0].float()
        if getattr(step.config.sample, "sde_type", "sde") == "cps":
            return batch.expand(dt.shape)
        return batch * torch.sqrt(-dt)

    def _batch_schedule(self, step: _TrainStep) -> _BatchSchedule:
        """The :class:`_BatchSchedule` of ``step``'s batch, computed on its first step.

        Each t is ``sigmas[scheduler.index_for_timestep(timestep)]`` (the index upstream's SDE
        step uses) and dt the next sigma minus it."""
        scheduler = step.pipeline.scheduler
        if self._batch is not None and self._batch.is_for(step.sample, scheduler, step.config):
            return self._batch
        draws, timesteps, _, _ = sources = _BatchSchedule.identity(step.sample, scheduler)
        schedule = scheduler.timesteps.cpu()
        index = torch.tensor(
            [[scheduler.index_for_timestep(t, schedule) for t in row] for row in timesteps.cpu()]
        )
        sigmas = scheduler.sigmas.to(device="cpu", dtype=torch.float32)
        device = step.mean.device
        t = sigmas[index]
        heads = self.store.heads(draws.flatten(0, 1)).view(*draws.shape[:2], -1)
        self._batch = _BatchSchedule(
            sources=tuple(SeenTensor.of(x) for x in sources),
            t=t.to(device),
            dt=(sigmas[index + 1] - t).to(device),
            heads=heads,
            config=step.config,
            loss_fn=self._loss_fn(step.config, sigmas),
        )
        return self._batch

    def replace_loss(self, upstream_loss: Tensor | None) -> Tensor | None:
        """regclip's loss for the step whose ``compute_log_prob`` ran last (or
        ``upstream_loss`` unchanged when there is none)."""
        step, self._step = self._step, None
        if step is None:
            return upstream_loss
        sample, j = step.sample, step.j
        batch = self._batch_schedule(step)
        t, dt = batch.t[:, j], batch.dt[:, j]
        stored = sample["next_latents"][:, j]
        old_mean = self.store.lookup(stored, ["mean"], heads=batch.heads[:, j])["mean"]
        next_sample = stored.float()
        loss_fn = self.validated(batch.loss_fn, j)
        out = loss_fn(
            advantages=sample["advantages"][:, j],
            mean=step.mean,
            old_mean=old_mean,
            next_sample=next_sample,
            std=self._transition_std(step, dt),
            dt=dt,
            t=t,
            log_prob=step.log_prob,
            old_log_prob=sample["log_probs"][:, j],
            ref_mean=step.ref_mean if loss_fn.kl is not None else None,
        )
        self.metrics.add(out, j)
        self.last_output = out
        return out.loss
