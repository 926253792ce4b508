"""What both adapters share: the ``--regclip_*`` options, the loss they build, the store of
rollout proposal means, metric logging through upstream's logger, version checks, and
the launchers' common body (:func:`launch`).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import math
import re
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any, Literal, TypeVar, cast

import torch
from torch import Tensor

import regclip
from regclip import GuardedPPOLoss, KLPenalty, LossOutput, TransitionKernel
from regclip.loss_config import LossConfig, Reweight, build_parts
from regclip.ratio import BatchRatioNorm, RatioNormalizer, Source

__all__ = [
    "IncompatibleUpstreamError",
    "LoggerProxy",
    "MetricLog",
    "Patches",
    "PreparedLaunch",
    "RegclipOptions",
    "SeenTensor",
    "StopTraining",
    "TransitionStore",
    "UpstreamAdapter",
    "build_loss",
    "command_line",
    "inject_gradient",
    "launch",
    "parse_known_options",
    "prepare_launch",
    "require_attributes",
    "require_parameters",
    "require_source",
    "run_launch",
    "run_main_block",
]

VANILLA_PRESETS = ("flow_grpo", "dance_grpo")


class IncompatibleUpstreamError(RuntimeError):
    """The upstream checkout does not have the functions/signatures the adapter patches."""


class StopTraining(Exception):
    """Raised by :class:`LoggerProxy` after ``--regclip_max_steps`` logged optimizer steps."""


# ----------------------------------------------------------------------------- options


@dataclass
class RegclipOptions:
    """The adapter's options; each is the command-line flag ``--regclip_<name>``."""

    preset: str = "grpo_guard"
    """A name of :data:`regclip.presets.PRESETS`."""
    clip_range: float | None = None
    """Symmetric clip range. Default: upstream's own (``config.train.clip_range``) for the
    vanilla presets and ``grpo_guard_official``, the preset's default (2e-6 for
    ``grpo_guard``) otherwise."""
    adv_clip: float | None = None
    """Advantage clamp. Default: upstream's (``adv_clip_max``)."""
    reweight: str = "auto"
    """``grpo_guard`` only: ``auto``, ``inverse_dt`` or ``equalizing``."""
    ratio_source: str | None = None
    """``auto``, ``log_prob`` or ``closed_form``. Default: ``log_prob`` for the vanilla
    presets and ``grpo_guard_official`` (upstream's numbers bit for bit), the preset's own
    (``auto``) otherwise."""
    fused: bool = False
    """Compute the guard loss with the fused Triton kernels (:mod:`regclip.fused`): calls
    they cannot run (no CUDA, no means) run eagerly; a loss they can never run (a KL term,
    the authors' batch-mean guard) is refused when it is built."""
    means_device: str = "same"
    """Where rollout means are kept: ``same`` (the rollout's device) or ``cpu``."""
    validate: str = "first"
    """Value checks of the loss inputs (finite, signs): ``first`` on each trained step's
    first loss call on this rank (a mis-wired run fails there, in one line), then off, so a
    step reads nothing back to the host; ``always`` on every call (each check a device
    synchronisation)."""
    max_steps: int = 0
    """Stop cleanly after this many logged optimizer steps (0: never)."""
    src: str | None = None
    """Upstream checkout (default: the environment variable, then the working directory)."""
    script: str | None = None
    """Which upstream training script the launcher runs, for adapters that drive several
    (Flow-GRPO: ``train_sd3`` (default), ``train_flux``, ...); the others refuse it."""


CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(sorted(regclip.presets.PRESETS)),
    "reweight": ("auto", "inverse_dt", "equalizing"),
    "ratio_source": ("auto", "log_prob", "closed_form"),
    "means_device": ("same", "cpu"),
    "validate": ("first", "always"),
}
"""The allowed values of the string options that have a fixed set."""


def _parse_optional_float(text: str) -> float | None:
    """A positive finite number, or ``none``."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number or 'none', got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def _parse_count(text: str) -> int:
    """A non-negative integer."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls``, as one line of plain text (no
    reStructuredText roles or literals)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split())
            docs[node.target.id] = re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")
    return docs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--regclip_<field>`` for every field of :class:`RegclipOptions`, its help the
    field's docstring."""
    group = parser.add_argument_group("regclip options (the rest goes to upstream's parser)")
    docs = _field_docs(RegclipOptions)
    for field in fields(RegclipOptions):
        kind: Callable[[str], Any]
        if field.name in ("clip_range", "adv_clip"):
            kind = _parse_optional_float
        elif field.name == "max_steps":
            kind = _parse_count
        elif field.name == "fused":
            kind = _parse_bool
        else:
            kind = str
        group.add_argument(
            f"--regclip_{field.name}",
            type=kind,
            default=field.default,
            choices=CHOICES.get(field.name),
            metavar=field.name.upper(),
            help=docs[field.name].replace("%", "%%")
            + ("" if field.default is None else f" [default: {field.default}]"),
        )


def _options_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from regclip.cli import OneLineParser

    parser = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    add_arguments(parser)
    return parser


def parse_known_options(
    argv: Sequence[str], prog: str | None = None
) -> tuple[RegclipOptions, list[str]]:
    """Split ``argv`` into regclip's options and the rest (left for the upstream parser).
    A bad ``--regclip_*`` value exits with one line, ``prog: error: ...``, status 2."""
    known, rest = _options_parser(prog).parse_known_args(list(argv))
    values = {f.name: getattr(known, f"regclip_{f.name}") for f in fields(RegclipOptions)}
    return RegclipOptions(**values), rest


def build_loss(
    options: RegclipOptions,
    *,
    sde: Literal["flow", "dance", "cps"],
    kernel: TransitionKernel,
    upstream_clip_range: float,
    upstream_adv_clip: float,
    kl_coef: float = 0.0,
    kl_variance: Literal["transition", "sigma"] = "sigma",
) -> GuardedPPOLoss:
    """The preset ``options.preset`` configured from the upstream run's own settings, built
    once from its parts (nothing is set on the loss after construction).

    ``kernel`` is the loss's transition kernel, for every preset (the vanilla ones too, for
    diagnostics). ``kl_coef`` is upstream's KL weight; with ``kl_variance="sigma"`` the KL
    divides by sigma_t^2 as Flow-GRPO's ``train_sd3.py`` does, so its ``beta`` keeps its
    meaning.
    """
    name = options.preset
    vanilla = name in VANILLA_PRESETS
    # the vanilla presets and the authors' guard: upstream's own clip range (the authors'
    # configs set theirs) and upstream's own log-prob arithmetic
    exact = vanilla or name == "grpo_guard_official"
    adv_clip = upstream_adv_clip if options.adv_clip is None else options.adv_clip
    clip_range = options.clip_range
    if clip_range is None and exact:
        clip_range = upstream_clip_range
    chosen = options.ratio_source or ("log_prob" if exact else None)
    if chosen is not None and chosen not in ("auto", "log_prob", "closed_form"):
        raise ValueError(
            f"--regclip_ratio_source must be auto/log_prob/closed_form, got {chosen!r}"
        )
    source = cast("Source | None", chosen)
    config = LossConfig(
        preset=name,
        clip_range=clip_range,
        adv_clip=adv_clip,
        sde=sde,
        reweight=cast(Reweight, options.reweight if name == "grpo_guard" else "auto"),
        fused=options.fused,
    )
    parts = build_parts(config, kernel)
    normalizer = parts.normalizer
    if source is not None and source != normalizer.source:
        normalizer = _with_source(normalizer, source)
    return GuardedPPOLoss.from_parts(
        parts._replace(
            normalizer=normalizer,
            kernel=kernel,
            kl=KLPenalty(kl_coef, kl_variance) if kl_coef > 0 else parts.kl,
        )
    )


def _with_source(normalizer: RatioNormalizer, source: Source) -> RatioNormalizer:
    """A fresh normalizer like ``normalizer`` whose log-ratio comes from ``source``."""
    if type(normalizer) is BatchRatioNorm:
        return BatchRatioNorm(source)
    if type(normalizer) is RatioNormalizer:
        return RatioNormalizer(
            debias=normalizer.debias,
            scale=normalizer.scale,
            source=source,
        )
    raise TypeError(f"cannot choose the ratio source of a {type(normalizer).__name__}")


# ----------------------------------------------------------------------------- rollout store


class TransitionStore:
    """Per-transition rollout data (the old proposal mean and any per-sample extras),
    keyed by the exact rollout draw ``x_{t+dt}``.

    Upstream trainers stack, mask, shuffle and re-batch their rollout tensors inline, so the
    adapter cannot add a column to them; instead it finds a transition again by its draw,
    which upstream stores verbatim (``next_latents``) and which is a fresh Gaussian sample,
    so distinct transitions have distinct keys. A key is the first ``key_size`` values of
    the draw in float64. Memory: one (C, H, W) float32 mean per stored transition, as much
    as upstream's own latents; ``device="cpu"`` keeps them off the accelerator (each
    :meth:`record` then copies to the host, a synchronisation).

    :meth:`record` reads nothing back to the host: it keeps each draw's key values on the
    draw's device, and the first :meth:`lookup` (or ``len``) after it brings the keys of
    every draw recorded since to the host in one transfer.
    """

    def __init__(self, device: str | torch.device | None = None, key_size: int = 16) -> None:
        self.device = device
        self.key_size = key_size
        self._rows: dict[bytes, dict[str, Tensor]] = {}
        self._pending: list[tuple[Tensor, dict[str, Tensor]]] = []  # (B, key_size), (B, ...)
        # the rounding fallback, per low-precision dtype: (stored draws it covers, rounded
        # key -> stored key, or None where two stored draws round alike)
        self._rounded_keys: dict[torch.dtype, tuple[int, dict[bytes, bytes | None]]] = {}

    def __len__(self) -> int:
        self._settle()
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self._pending.clear()
        self._rounded_keys.clear()

    def _device_heads(self, draws: Tensor) -> Tensor:
        head = draws.detach().reshape(draws.shape[0], -1)[:, : self.key_size]
        return head.to(torch.float64, copy=True)  # a copy: the draw may change in place later

    def heads(self, draws: Tensor) -> Tensor:
        """(N, key_size) float64 key values (on the host) of the N draws (N, ...): one
        device-to-host transfer, which a caller can make once for many lookups."""
        return self._device_heads(draws).cpu()

    def _settle(self) -> None:
        """Key the draws recorded since the last call (one transfer for all of them)."""
        if not self._pending:
            return
        heads = torch.cat([h.to(self._pending[0][0].device) for h, _ in self._pending])
        keys = iter(row.tobytes() for row in heads.cpu().numpy())
        for batch_heads, values in self._pending:
            for b in range(batch_heads.shape[0]):
                self._rows[next(keys)] = {name: value[b] for name, value in values.items()}
        self._pending.clear()

    def _rounded(self, dtype: torch.dtype, keys: list[bytes]) -> list[bytes]:
        """Keys of the stored draws that equal the looked-up draws (their ``keys``, key values
        of draws stored as ``dtype``) once rounded to ``dtype``: a pipeline may keep its
        latents in bf16/fp16 after the fp32 step that drew them. A key that matches no stored
        draw, or two, is returned unchanged (so the lookup reports it missing). The table of
        rounded keys is built once per dtype and store content: a lookup is a dict read."""
        size, table = self._rounded_keys.get(dtype, (-1, {}))
        if size != len(self._rows):
            stored = list(self._rows)
            values = [torch.frombuffer(bytearray(k), dtype=torch.float64) for k in stored]
            rounded = torch.stack(values).to(dtype).double() if values else torch.empty(0)
            table = {}
            for key, row in zip(stored, rounded.numpy(), strict=True):
                row_key = row.tobytes()
                table[row_key] = None if row_key in table else key
            self._rounded_keys[dtype] = (len(stored), table)
        return [table.get(key) or key for key in keys]

    def record(self, next_sample: Tensor, **per_sample: Tensor) -> None:
        """Store ``per_sample`` tensors ((B, ...) each) under the keys of ``next_sample``."""
        values = {
            name: value.detach().to(self.device) if self.device is not None else value.detach()
            for name, value in per_sample.items()
        }
        self._pending.append((self._device_heads(next_sample), values))

    def lookup(
        self, next_sample: Tensor, names: Iterable[str], heads: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Stacked (B, ...) tensors ``names`` for the transitions whose draw is
        ``next_sample``, on ``next_sample``'s device. Pass the draws in the dtype upstream
        stored them: bf16/fp16 draws are also matched to fp32 recorded ones rounded alike.
        ``heads``: the draws' :meth:`heads`, when the caller has them (then the lookup reads
        nothing back from the device)."""
        self._settle()
        heads = self.heads(next_sample) if heads is None else heads
        keys = [row.tobytes() for row in heads.numpy()]
        low_precision = next_sample.dtype in (torch.bfloat16, torch.float16)
        if low_precision and any(key not in self._rows for key in keys):
            keys = self._rounded(next_sample.dtype, keys)
        missing = sum(key not in self._rows for key in keys)
        if missing:
            raise KeyError(
                f"{missing} of {len(keys)} transitions were not recorded during the rollout "
                f"({len(self)} stored). The adapter records the rollout through upstream's "
                "sampling function: was the rollout made by another code path, or the store "
                "cleared in between?"
            )
        return {
            name: torch.stack([self._rows[key][name] for key in keys]).to(next_sample.device)
            for name in names
        }


# ----------------------------------------------------------------------------- loss plumbing


class _GradientSwap(torch.autograd.Function):
    """Forward: ``value`` unchanged. Backward: ``value`` gets no gradient, ``loss`` gets 1."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, loss: Tensor) -> Tensor:  # type: ignore[override]
        ctx.loss_meta = (loss.dtype, loss.device)
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_value: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        dtype, device = ctx.loss_meta
        return None, torch.ones((), dtype=dtype, device=device)


def inject_gradient(value: Tensor, loss: Tensor) -> Tensor:
    """Return ``value`` so that whatever upstream builds from it backpropagates ``loss``.

    Upstream code that computes its own loss from ``value`` and calls ``.backward()`` then
    gives the parameters exactly ``d loss / d theta`` (the path through ``value`` is cut),
    while its printed numbers stay those of its own formula.
    """
    return _GradientSwap.apply(value, loss)


class MetricLog:
    """Running means of :attr:`regclip.LossOutput.metrics` and per-timestep statistics,
    flushed into upstream's logger as ``regclip/<name>`` and ``regclip/step<k>/<name>``.

    :meth:`add` (every micro-step) only accumulates on the loss's device: it never reads
    a value on the host, so it costs no device synchronisation. :meth:`flush` (once per
    logged optimizer step) brings everything to the host in one transfer. The per-step
    statistics are :meth:`regclip.TimestepDiagnostics.summary`'s: the samples of a step
    pooled over the calls, population std.
    """

    PER_STEP = ("ratio/mean", "ratio/std", "log_ratio/std", "clip/frac")
    _FIELDS = ("n", "ratio_dev", "ratio_dev_sq", "log_ratio", "log_ratio_sq", "clipped")
    """Per-sample sums behind :attr:`PER_STEP` (ratio - 1 as TimestepDiagnostics keeps it)."""

    def __init__(self, prefix: str = "regclip/") -> None:
        self.prefix = prefix
        self._sums: dict[tuple[str, ...], Tensor] = {}  # metric names -> (M,) running sums
        self._calls = 0
        self._by_step: dict[int, Tensor] = {}  # int step index -> (F,) sums of _FIELDS
        self._rows: list[tuple[Tensor, Tensor]] = []  # tensor step indices: ((B,), (B, F))

    @staticmethod
    def _dtype(device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    @torch.no_grad()
    def add(self, output: LossOutput, step_index: int | Sequence[int] | Tensor) -> None:
        """Accumulate one loss call whose transitions are at ``step_index`` (an int, or
        (B,) indices), without a host read. The call's metrics are summed as one (M,)
        tensor: when they share a dtype (the losses' metrics do), three kernels instead of
        two per metric; mixed dtypes are each cast first, so none is rounded by another's."""
        metrics = output.metric_tensors
        if metrics:
            names = tuple(metrics)
            values = list(metrics.values())
            dtype = self._dtype(values[0].device)
            if any(v.dtype != values[0].dtype for v in values):
                values = [v.to(dtype) for v in values]
            stacked = torch.stack(values).to(dtype)
            total = self._sums.get(names)
            self._sums[names] = stacked if total is None else total + stacked
        self._calls += 1
        ratio = output.ratio.detach()
        dtype = self._dtype(ratio.device)
        dev = ratio.to(dtype) - 1
        log_ratio = output.log_ratio.detach().to(dtype)
        fields = torch.stack(
            [
                torch.ones_like(dev),
                dev,
                dev**2,
                log_ratio,
                log_ratio**2,
                output.clipped.detach().to(dtype),
            ],
            dim=1,
        )  # (B, F)
        if isinstance(step_index, int):
            sums = fields.sum(dim=0)
            known = self._by_step.get(step_index)
            self._by_step[step_index] = sums if known is None else known + sums
        else:
            steps = torch.as_tensor(step_index, device=ratio.device).reshape(-1)
            self._rows.append((steps.expand(fields.shape[0]).to(dtype), fields))

    def flush(self) -> dict[str, float]:
        """The means since the last flush (one device-to-host transfer); then resets."""
        if self._calls == 0:
            return {}
        names = [name for key in self._sums for name in key]
        known = sorted(self._by_step)
        n_fields = len(self._FIELDS)
        parts = list(self._sums.values())
        parts += [self._by_step[k] for k in known]
        parts += [
            torch.cat([steps[:, None], rows], dim=1).reshape(-1) for steps, rows in self._rows
        ]
        device = parts[0].device if parts else torch.device("cpu")
        dtype = self._dtype(device)
        flat = (
            torch.cat([p.to(device=device, dtype=dtype) for p in parts]).tolist() if parts else []
        )
        out: dict[str, float] = {}
        for n, v in zip(names, flat[: len(names)], strict=True):  # a name under two keys adds
            out[f"{self.prefix}{n}"] = out.get(f"{self.prefix}{n}", 0.0) + v / self._calls
        pos = len(names)
        totals: dict[int, list[float]] = {}
        for step in known:
            totals[step] = flat[pos : pos + n_fields]
            pos += n_fields
        while pos < len(flat):  # rows of (step, *fields)
            step, row = int(flat[pos]), flat[pos + 1 : pos + 1 + n_fields]
            acc = totals.setdefault(step, [0.0] * n_fields)
            totals[step] = [a + b for a, b in zip(acc, row, strict=True)]
            pos += 1 + n_fields
        for step in sorted(totals):
            out.update(
                {
                    f"{self.prefix}step{step:02d}/{name}": value
                    for name, value in self._summary(totals[step]).items()
                }
            )
        self._sums.clear()
        self._calls = 0
        self._by_step.clear()
        self._rows.clear()
        return out

    @staticmethod
    def _summary(acc: list[float]) -> dict[str, float]:
        """:meth:`regclip.TimestepDiagnostics.summary`'s :attr:`PER_STEP` values."""
        count, dev, dev_sq, lr, lr_sq, clipped = acc
        n = max(count, 1.0)
        dev_mean, lr_mean = dev / n, lr / n
        return {
            "ratio/mean": 1.0 + dev_mean,
            "ratio/std": max(dev_sq / n - dev_mean**2, 0.0) ** 0.5,
            "log_ratio/std": max(lr_sq / n - lr_mean**2, 0.0) ** 0.5,
            "clip/frac": clipped / n,
        }


class LoggerProxy:
    """Stands in for upstream's ``wandb`` module: forwards everything, and adds regclip's
    metrics to the logs that ``is_train_log`` recognizes (one per optimizer step)."""

    def __init__(
        self,
        logger: Any,
        metrics: MetricLog,
        is_train_log: Callable[[dict[str, Any]], bool],
        max_steps: int = 0,
    ) -> None:
        self._logger = logger
        self._metrics = metrics
        self._is_train_log = is_train_log
        self._max_steps = max_steps
        self.train_logs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)

    def log(self, data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._is_train_log(data):
            data = {**data, **self._metrics.flush()}
            self.train_logs += 1
        result = self._logger.log(data, *args, **kwargs)
        if self._max_steps and self.train_logs >= self._max_steps:
            raise StopTraining(f"stopped after {self.train_logs} optimizer steps")
        return result


# ----------------------------------------------------------------------------- patching


@dataclass(frozen=True)
class SeenTensor:
    """A tensor an adapter has read to the host, held weakly (a freed tensor never matches
    a new one) with its version counter (one written in place since no longer matches)."""

    ref: weakref.ref[Tensor]
    version: int

    @classmethod
    def of(cls, tensor: Tensor) -> SeenTensor:
        return cls(weakref.ref(tensor), tensor._version)

    def matches(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is the tensor seen, unwritten since."""
        return self.ref() is tensor and self.version == tensor._version


class Patches:
    """Module attribute replacements that can be undone."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> Any:
        """Replace ``owner.name`` by ``value``; returns the original."""
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, value)
        return original

    def undo(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)


_AdapterT = TypeVar("_AdapterT", bound="UpstreamAdapter")


class UpstreamAdapter:
    """What both adapters hold: the upstream checkout, the options, the store of rollout
    means, the metric log, the loss (built on first use) and the upstream functions they
    wrap. A subclass's :meth:`install` sets its patches through ``self._patches``;
    :meth:`uninstall` undoes them. Use as a context manager."""

    def __init__(self, upstream: Any, options: RegclipOptions | None = None) -> None:
        self.upstream = upstream
        self.options = options or RegclipOptions()
        self.store = TransitionStore("cpu" if self.options.means_device == "cpu" else None)
        self.metrics = MetricLog()
        self.loss_fn: GuardedPPOLoss | None = None
        self.last_output: Any = None
        self._patches = Patches()
        self._originals: dict[str, Callable[..., Any]] = {}
        self._trained_since_rollout = False
        self._checked: set[int] = set()  # trained steps whose loss inputs were checked

    def install(self: _AdapterT) -> _AdapterT:
        raise NotImplementedError

    def validated(self, loss_fn: GuardedPPOLoss, step: int) -> GuardedPPOLoss:
        """``loss_fn`` with its value checks on or off for this call on trained step
        ``step`` (:attr:`RegclipOptions.validate`)."""
        loss_fn.validate = self.options.validate == "always" or step not in self._checked
        self._checked.add(step)
        return loss_fn

    def uninstall(self) -> None:
        self._patches.undo()

    def __enter__(self: _AdapterT) -> _AdapterT:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def _incompatible(where: str, problem: str, commit: str) -> IncompatibleUpstreamError:
    return IncompatibleUpstreamError(
        f"{where}: {problem}. This adapter was written and tested against upstream commit "
        f"{commit}; check out that commit or update the adapter (docs/integrations.md)."
    )


def require_attributes(module: ModuleType, names: Iterable[str], commit: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise _incompatible(module.__name__, f"missing {missing}", commit)


def require_parameters(fn: Callable[..., Any], names: Sequence[str], commit: str) -> None:
    """``fn`` must take ``names`` as its leading parameters, in this order."""
    params = list(inspect.signature(fn).parameters)
    if params[: len(names)] != list(names):
        raise _incompatible(
            f"{fn.__module__}.{fn.__qualname__}",
            f"parameters are {params}, expected them to start with {list(names)}",
            commit,
        )


def require_source(fn: Callable[..., Any], snippets: Iterable[str], commit: str) -> None:
    """``fn``'s source must contain every snippet (whitespace-insensitive)."""
    source = "".join(inspect.getsource(fn).split())
    missing = [s for s in snippets if "".join(s.split()) not in source]
    if missing:
        raise _incompatible(f"{fn.__module__}.{fn.__qualname__}", f"source lacks {missing}", commit)


def run_main_block(module: ModuleType) -> None:
    """Execute the module's ``if __name__ == "__main__":`` body in its own namespace, so
    that upstream's argument parsing and ``main`` run with the adapter's patches."""
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            block = ast.Module(body=node.body, type_ignores=[])
            exec(compile(block, inspect.getfile(module), "exec"), module.__dict__)
            return
    raise IncompatibleUpstreamError(f"{module.__name__} has no `if __name__ == '__main__':` block")


@dataclass
class PreparedLaunch:
    """A launcher's run, ready to start: regclip's options, the loaded upstream checkout
    and ``sys.argv`` for upstream's script (its path, then the non-regclip flags)."""

    options: RegclipOptions
    upstream: Any
    argv: list[str]


def prepare_launch(
    argv: Sequence[str], load_upstream: Callable[..., Any], script: str, prog: str | None = None
) -> PreparedLaunch:
    """Split the ``--regclip_*`` flags off ``argv`` and load the upstream checkout
    (``load_upstream(options.src)``). ``script``: the upstream's training script, unless
    the loaded upstream names its own ``script_path`` (as with ``--regclip_script``)."""
    options, rest = parse_known_options(argv, prog)
    if options.script is None:
        upstream = load_upstream(options.src)
    elif "script" in inspect.signature(load_upstream).parameters:
        upstream = load_upstream(options.src, script=options.script)
    else:
        raise ValueError(f"--regclip_script is not an option of this launcher ({script})")
    script = getattr(upstream, "script_path", script)
    return PreparedLaunch(options, upstream, [str(upstream.root / script), *rest])


def run_launch(
    prepared: PreparedLaunch,
    adapter: Callable[[Any, RegclipOptions], AbstractContextManager[Any]],
) -> int:
    """Inside ``adapter(upstream, options)``, run the ``__main__`` block of upstream's
    training script with ``sys.argv = prepared.argv``. Returns the exit status: the code
    of a ``sys.exit`` in upstream's block (absl's ``app.run`` always exits), else 0; a
    :class:`StopTraining` (``--regclip_max_steps``) ends the run with a message and 0."""
    with adapter(prepared.upstream, prepared.options):
        sys.argv = list(prepared.argv)
        try:
            run_main_block(prepared.upstream.train_module)
        except StopTraining as stop:
            print(f"[regclip] {stop}")
        except SystemExit as done:
            return int(done.code or 0)
    return 0


def launch(
    argv: Sequence[str] | None,
    load_upstream: Callable[..., Any],
    adapter: Callable[[Any, RegclipOptions], AbstractContextManager[Any]],
    script: str,
) -> int:
    """:func:`prepare_launch` then :func:`run_launch` (``argv`` default:
    ``sys.argv[1:]``); errors propagate as exceptions (:func:`command_line` turns the
    user's into one line)."""
    prepared = prepare_launch(sys.argv[1:] if argv is None else argv, load_upstream, script)
    return run_launch(prepared, adapter)


def _one_line(error: Exception) -> str:
    """A loading error as the one line a user reads."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return (
            f"the upstream code imports {error.name!r}, which is not installed here: install "
            "the upstream checkout's own requirements (docs/integrations.md)"
        )
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def command_line(
    argv: Sequence[str] | None,
    load_upstream: Callable[..., Any],
    adapter: Callable[[Any, RegclipOptions], AbstractContextManager[Any]],
    script: str,
) -> int:
    """The command line of both ``launch.py`` drop-ins: :func:`launch`, except that a
    mistake found before upstream's script starts (a bad ``--regclip_*`` value, a missing
    or unsupported checkout, an upstream dependency that is not installed) ends in one
    line, ``launch.py: error: ...``, exit status 2; ``--help`` lists the ``--regclip_*``
    options, then upstream's own when a checkout loads."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _options_parser()
    wants_help = "-h" in args or "--help" in args
    if wants_help:
        print(parser.format_help())
    try:
        prepared = prepare_launch(args, load_upstream, script)
    except (ValueError, FileNotFoundError, ImportError, IncompatibleUpstreamError) as error:
        if wants_help:
            print(f"upstream's own options are not listed: {_one_line(error)}")
            return 0
        parser.error(_one_line(error))
    return run_launch(prepared, adapter)


def transition_std(sigma_t_or_std: Tensor, dt: Tensor) -> Tensor:
    """(B,) ``s_t = sigma_t sqrt(-dt)`` from a (B, 1, ...) sigma_t and (B,) dt."""
    return sigma_t_or_std.reshape(sigma_t_or_std.shape[0], -1)[:, 0] * torch.sqrt(-dt)
