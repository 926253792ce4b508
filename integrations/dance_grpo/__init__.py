"""regclip inside DanceGRPO's ``fastvideo/train_grpo_flux.py``; see :mod:`.adapter`."""

from .adapter import DANCEGRPO_COMMIT, DanceGRPOAdapter, UpstreamDanceGRPO, load_upstream

__all__ = ["DANCEGRPO_COMMIT", "DanceGRPOAdapter", "UpstreamDanceGRPO", "load_upstream"]
