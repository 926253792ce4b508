"""Drop-in for Flow-GRPO's ``scripts/train_*.py``: the same flags and config, plus
``--regclip_*``; ``--regclip_script`` picks the script (default ``train_sd3``; see
:data:`integrations.flow_grpo.adapter.SCRIPTS`).

Run it from the flow_grpo checkout, exactly where upstream's script would run::

    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \\
        --num_processes=8 --main_process_port 29501 \\
        /path/to/regclip/integrations/flow_grpo/launch.py \\
        --config config/grpo.py:pickscore_sd3 --regclip_preset grpo_guard

    # Flux: the same, with upstream's Flux config and --regclip_script train_flux

Everything but ``--regclip_*`` goes to upstream's own absl/ml_collections parser.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `integrations` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from integrations.common import command_line
from integrations.flow_grpo.adapter import FlowGRPOAdapter, load_upstream


def main(argv: list[str] | None = None) -> int:
    return command_line(argv, load_upstream, FlowGRPOAdapter, "scripts/train_sd3.py")


if __name__ == "__main__":
    sys.exit(main())
