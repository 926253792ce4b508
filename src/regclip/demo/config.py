"""Experiment configuration: one dataclass, three named budgets (``tiny``, ``cpu``, ``gpu``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

__all__ = ["METHOD_NAMES", "PRESET_BUDGETS", "DemoConfig"]

CACHE_VERSION = 2
"""Bump when the networks or the pretraining change, so stale caches are not loaded."""

METHOD_NAMES: tuple[str, ...] = (
    "flow_grpo",
    "grpo_guard",
    "velocity_guard",
    "ratio_norm",
    "mean_revised",
    "flow_grpo_kl",
    "flow_grpo_dance",
    "grpo_guard_dance",
    "velocity_guard_dance",
    "flow_grpo_uniform",
    "grpo_guard_uniform",
    "velocity_guard_uniform",
)
"""Every method the demo knows (:func:`regclip.demo.grpo.method_spec` defines each)."""


@dataclass(frozen=True)
class DemoConfig:
    """All knobs of one ``regclip demo`` run. Pretraining fields key the cache."""

    size: int = 32
    """Image side; D = size**2."""
    width: int = 24
    """Generator base channels."""
    patch: int = 4
    """Generator patch size (its convolutions run at size / patch)."""
    pretrain_steps: int = 600
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    classifier_steps: int = 300
    steps: int = 20
    """GRPO iterations (one rollout each)."""
    group_size: int = 6
    """Samples per class per rollout (10 classes -> 10 * group_size per rollout)."""
    passes: int = 4
    """Optimizer steps per rollout (the ratio leaves 1 only after the first)."""
    lr: float = 3e-4
    num_steps: int = 8
    """Sampling steps T of rollouts and evaluation."""
    shift: float = 3.0
    """SD3 time shift of the default schedule."""
    flow_eta: float = 0.7
    dance_eta: float = 0.3
    kl_coef: float = 0.1
    """KL coefficient of the ``flow_grpo_kl`` baseline (upstream's sigma^2 convention)."""
    clip_target: float = 0.2
    """Clip range per method: the one that puts this fraction of second-pass ratios outside
    [1 - eps, 1 + eps] on a probe rollout from the pretrained model."""
    eval_every: int = 5
    eval_per_class: int = 8
    methods: tuple[str, ...] = ("flow_grpo", "grpo_guard", "velocity_guard")
    seeds: tuple[int, ...] = (0,)
    dims: tuple[int, ...] = (64, 256, 1024, 4096, 16384)
    """Latent dimensions of the left-shift-versus-D measurement."""
    device: str = "cpu"
    time_budget: float | None = None
    """Seconds; a run is skipped (and listed as skipped) when the elapsed time plus the
    previous run's duration would exceed it."""

    @property
    def dim(self) -> int:
        return self.size * self.size

    def pretrain_key(self) -> str:
        """Short hash of the fields that determine the pretrained weights."""
        fields = (
            "size",
            "width",
            "patch",
            "pretrain_steps",
            "pretrain_batch",
            "pretrain_lr",
            "classifier_steps",
        )
        key = {name: getattr(self, name) for name in fields} | {"version": CACHE_VERSION}
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, object]:
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
        }


PRESET_BUDGETS: dict[str, dict[str, object]] = {
    "tiny": dict(
        size=16,
        width=8,
        patch=2,
        pretrain_steps=40,
        classifier_steps=40,
        steps=2,
        group_size=2,
        passes=2,
        num_steps=4,
        eval_every=1,
        eval_per_class=2,
        dims=(64, 256),
    ),
    "cpu": {},
    "gpu": dict(
        size=64,
        width=64,
        patch=8,
        pretrain_steps=3000,
        pretrain_batch=256,
        classifier_steps=1500,
        steps=120,
        group_size=16,
        num_steps=10,
        eval_every=10,
        eval_per_class=16,
        lr=1e-4,
        methods=METHOD_NAMES,
        dims=(64, 256, 1024, 4096, 16384, 65536),
    ),
}
"""Overrides of :class:`DemoConfig` per ``--budget``; ``cpu`` is the default."""
