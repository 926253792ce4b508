"""Drop-in for ``fastvideo/train_grpo_flux.py``: the same flags, plus ``--regclip_*``.

Run it from the DanceGRPO checkout with upstream's own torchrun line, replacing only the
script path (``scripts/finetune/finetune_flux_grpo.sh``)::

    torchrun --nnodes 1 --nproc_per_node 8 --node_rank 0 --rdzv_endpoint $MASTER:29502 \\
        /path/to/regclip/integrations/dance_grpo/launch.py \\
        --seed 42 --pretrained_model_name_or_path data/flux ... \\
        --regclip_preset grpo_guard

Everything but ``--regclip_*`` goes to upstream's argparse; its FSDP setup is unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `integrations` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from integrations.common import command_line
from integrations.dance_grpo.adapter import DanceGRPOAdapter, load_upstream


def main(argv: list[str] | None = None) -> int:
    return command_line(argv, load_upstream, DanceGRPOAdapter, "fastvideo/train_grpo_flux.py")


if __name__ == "__main__":
    sys.exit(main())
