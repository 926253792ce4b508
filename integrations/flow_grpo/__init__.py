"""regclip inside Flow-GRPO's ``scripts/train_*.py``; see :mod:`.adapter` and ``launch.py``."""

from .adapter import (
    FLOW_GRPO_COMMIT,
    FLOW_GRPO_COMMITS,
    SCRIPTS,
    FlowGRPOAdapter,
    UpstreamFlowGRPO,
    load_upstream,
)

__all__ = [
    "FLOW_GRPO_COMMIT",
    "FLOW_GRPO_COMMITS",
    "SCRIPTS",
    "FlowGRPOAdapter",
    "UpstreamFlowGRPO",
    "load_upstream",
]
