"""regclip inside Flow-GRPO's ``scripts/train_sd3.py``; see :mod:`.adapter` and ``launch.py``."""

from .adapter import FLOW_GRPO_COMMIT, FlowGRPOAdapter, UpstreamFlowGRPO, load_upstream

__all__ = ["FLOW_GRPO_COMMIT", "FlowGRPOAdapter", "UpstreamFlowGRPO", "load_upstream"]
