"""``regclip demo``: implicit over-optimization and its fix, end to end, on digits.

A class-conditional rectified-flow generator is pretrained here on scikit-learn's bundled
8x8 digits brought to a larger resolution (:mod:`.data`, :mod:`.nets`, :mod:`.pretrain`),
then fine-tuned with GRPO on a hackable proxy reward using the library's kernels and
``GuardedPPOLoss`` presets (:mod:`.rollout`, :mod:`.grpo`), and judged by held-out gold
metrics that are never optimized (:mod:`.metrics`). :mod:`.experiment` runs methods x seeds
and writes the machine-readable summary; :mod:`.dimension` measures the left shift of the
vanilla ratio against the latent dimension; :mod:`.plots` draws the figures.
"""
