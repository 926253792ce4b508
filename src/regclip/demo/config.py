"""Configuration of the frontier testbed: one dataclass, named budgets (tiny, cpu, gpu)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

__all__ = ["CLIP_GRID", "PRESET_BUDGETS", "DemoConfig"]

CACHE_VERSION = 4
"""Bump when the networks or the pretraining change, so stale caches are not loaded."""


CLIP_GRID: tuple[float | None, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 4.0, None)
"""Clip settings of the large testbed: multiples of each method's calibrated range over a
64x span, and no clipping."""


@dataclass(frozen=True)
class DemoConfig:
    """All knobs of one run of the testbed. Pretraining fields key the checkpoint cache."""

    size: int = 24
    """Image side; D = size**2."""
    patch: int = 4
    """Mixer patch side (tokens = (size / patch)**2)."""
    width: int = 48
    """Mixer channels."""
    depth: int = 2
    pretrain_steps: int = 1500
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    num_steps: int = 8
    """Sampling steps T of rollouts and evaluation."""
    shift: float = 3.0
    """SD3 time shift of the schedule."""
    flow_eta: float = 0.7
    dance_eta: float = 0.3
    groups: int = 2
    """Groups per rollout (the world is unconditional: a group is G draws sharing a baseline)."""
    group_size: int = 8
    iterations: int = 40
    """GRPO iterations (one rollout each)."""
    lr: float = 3e-4
    """Adam learning rate of every run."""
    passes: tuple[int, ...] = (4,)
    """Optimizer steps per rollout; the ratio leaves 1 only after the first."""
    methods: tuple[str, ...] = ("flow_grpo", "grpo_guard", "velocity_guard")
    clip_scales: tuple[float | None, ...] = (0.25, 1.0, 4.0)
    """Clip ranges as multiples of each method's calibrated base (None: no clipping)."""
    clip_target: float = 0.2
    """A method's base clip range puts this fraction of second-pass ratios outside it on a
    probe rollout from the pretrained generator."""
    kl_coefs: tuple[float, ...] = (0.02,)
    """KL coefficients of ``flow_grpo_kl`` (upstream's sigma^2 convention), one run each at
    the calibrated clip range."""
    kl_bounds: tuple[float, ...] = (0.25, 1.0, 4.0)
    """KL-mask bounds as multiples of the calibrated base bound."""
    adaptive_targets: tuple[float, ...] = (0.15,)
    """Target clip fractions of ``adaptive_guard`` (0.15 is the preset's default), one run
    each."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Replicates: seed ``s`` draws its own pretrained generator, its own proxy rater and its
    own GRPO noise, so no two replicates share a source of randomness."""
    levels: tuple[float, ...] = ()
    """Pre-registered proxy-gain levels (empty: a quarter, half and three quarters of each
    slice's median final gain); samples are kept where the gain first reaches the middle
    one."""
    phase: str = "exploration"
    """``"exploration"`` (tuning) or ``"confirmation"`` (pre-registered), recorded per run."""
    eval_every: int = 1
    """Evaluate every this many iterations (1: every iteration, so each proxy level is read
    between two measured points)."""
    eval_samples: int = 32
    """ODE samples from fixed noise per evaluation."""
    device: str = "cpu"
    checkpoint_blocks: bool = False
    """Recompute the network's blocks in the backward pass (same gradients, far less memory:
    lets hundreds of runs share one GPU)."""
    time_limit: float | None = None
    """Seconds; an ensemble still training then is evaluated and stopped early (its curve
    ends there)."""

    @property
    def dim(self) -> int:
        return self.size * self.size

    def pretrain_key(self) -> str:
        """Short hash of the fields that determine the pretrained weights."""
        fields = (
            "size",
            "patch",
            "width",
            "depth",
            "pretrain_steps",
            "pretrain_batch",
            "pretrain_lr",
        )
        key = {name: getattr(self, name) for name in fields} | {"version": CACHE_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def __post_init__(self) -> None:
        if self.phase not in ("exploration", "confirmation"):
            raise ValueError(f"phase must be 'exploration' or 'confirmation', got {self.phase!r}")

    def to_json(self) -> dict[str, object]:
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
        }


PRESET_BUDGETS: dict[str, dict[str, object]] = {
    "tiny": dict(
        size=16,
        patch=4,
        width=16,
        depth=1,
        pretrain_steps=30,
        pretrain_batch=32,
        num_steps=4,
        groups=2,
        group_size=4,
        iterations=2,
        eval_samples=8,
        seeds=(0,),
        clip_scales=(1.0,),
    ),
    "cpu": {},
    "gpu": dict(
        size=64,
        patch=8,
        width=128,
        depth=4,
        pretrain_steps=8000,
        pretrain_batch=256,
        num_steps=10,
        groups=2,
        group_size=16,
        iterations=40,
        lr=1e-4,
        eval_samples=64,
        checkpoint_blocks=True,
        seeds=(0, 1, 2, 3, 4, 5, 6, 7),
        methods=(
            "flow_grpo",
            "grpo_guard",
            "velocity_guard",
            "ratio_norm",
            "flow_grpo_kl",
            "adaptive_guard",
            "kl_mask",
        ),
        clip_scales=CLIP_GRID,
        kl_bounds=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 4.0),
        kl_coefs=(0.02, 0.1),
        adaptive_targets=(0.05, 0.15, 0.3),
    ),
}
"""Overrides of :class:`DemoConfig` per ``--budget``; ``cpu`` is the default."""
