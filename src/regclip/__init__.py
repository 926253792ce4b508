"""regclip: regulated clipping (GRPO-Guard) for RL fine-tuning of flow-matching generators.

Swap one loss::

    import regclip
    loss_fn = regclip.presets.grpo_guard(sde="flow")
    out = loss_fn(advantages=adv, mean=mu, old_mean=mu_old, next_sample=x_next, std=s, dt=dt)
    out.loss.backward(); log(out.metrics)
"""

from . import fused, presets, replay
from .adaptive import AdaptiveClip
from .advantages import group_advantages
from .batch import LowPrecisionMeanWarning, LowPrecisionOldMeanWarning, TransitionBatch
from .diagnostics import METRIC_NAMES, TimestepDiagnostics, calibrate_clip_range
from .kernels import (
    CPS,
    DanceSDE,
    FlowSDE,
    KernelStep,
    TransitionKernel,
    gaussian_log_prob,
    make_kernel,
)
from .kl import KLPenalty
from .loss import GuardedPPOLoss
from .loss_config import LossConfig
from .output import LossOutput
from .ratio import (
    BatchRatioNorm,
    IdentityRatio,
    MeanRevisedRatio,
    RatioNorm,
    RatioNormalizer,
    VelocityRatio,
)
from .reweight import (
    BatchInverseDtWeight,
    CustomWeight,
    DanceBetaWeight,
    EqualizingWeight,
    InverseDtWeight,
    TimestepReweighter,
    UniformWeight,
)
from .surrogate import AsymmetricClip, ClippedSurrogate, DualClip, NoClip, PPOClip, SurrogateOutput
from .trust_region import KLMask, transition_kl

__version__ = "0.1.0"

__all__ = [
    "CPS",
    "METRIC_NAMES",
    "AdaptiveClip",
    "AsymmetricClip",
    "BatchInverseDtWeight",
    "BatchRatioNorm",
    "ClippedSurrogate",
    "CustomWeight",
    "DanceBetaWeight",
    "DanceSDE",
    "DualClip",
    "EqualizingWeight",
    "FlowSDE",
    "GuardedPPOLoss",
    "IdentityRatio",
    "InverseDtWeight",
    "KLMask",
    "KLPenalty",
    "KernelStep",
    "LossConfig",
    "LossOutput",
    "LowPrecisionMeanWarning",
    "LowPrecisionOldMeanWarning",
    "MeanRevisedRatio",
    "NoClip",
    "PPOClip",
    "RatioNorm",
    "RatioNormalizer",
    "SurrogateOutput",
    "TimestepDiagnostics",
    "TimestepReweighter",
    "TransitionBatch",
    "TransitionKernel",
    "UniformWeight",
    "VelocityRatio",
    "calibrate_clip_range",
    "fused",
    "gaussian_log_prob",
    "group_advantages",
    "make_kernel",
    "presets",
    "replay",
    "transition_kl",
]
