"""Adapters that run regclip's losses inside the public GRPO trainers.

Each adapter imports the user's own checkout of the upstream trainer and patches a few of
its module-level functions at run time (nothing from upstream is copied here):

- :mod:`integrations.flow_grpo`: Flow-GRPO's ``scripts/train_*.py`` at 9745241 (SD3.5-M,
  FLUX.1-dev, Qwen-Image, Wan2.1; fast/CPS variants) and ``train_sd3.py`` at ac4c86e.
- :mod:`integrations.dance_grpo`: DanceGRPO's ``fastvideo/train_grpo_flux.py`` (FLUX.1-dev).

See ``docs/integrations.md`` for the commands.
"""
