"""``regclip demo``: a reward-hacking testbed whose gold is exact, and the methods' frontiers.

The disc world (:mod:`.world`) draws one soft disc on a flat background; its gold score is
an exact least-squares fit of the world's own renderer to any image. A small generator is
pretrained on it (:mod:`.nets`, :mod:`.pretrain`), then fine-tuned with GRPO against a
contrast rater learned on a biased slice of the world (:mod:`.reward`), which also pays for
a brighter background: the known hack. :mod:`.engine` trains many runs (methods x clip
ranges x passes x seeds, :mod:`.arms`) in lockstep on one device; :mod:`.experiment` writes
``frontier.json``; :mod:`.analysis` compares methods at matched proxy gain and at matched
speed with bootstrap intervals; :mod:`.report` and :mod:`.plots` show the result.
"""
