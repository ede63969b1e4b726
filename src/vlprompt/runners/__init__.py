"""One runner per paradigm, each a thin composition of :mod:`vlprompt.core` (recipes that do not inherit from each
other): ``continual`` (task sequences; continual image-text retrieval), ``cil`` (class-incremental
classification, a learner for the same task sequence), ``tta`` (episodic test-time adaptation), ``pretrain`` (full
fine-tuning, the embedded CLIPs' recipe) and ``eval_run`` (evaluate a run, an export or a config; record it).
A new capability (grounding, captioning) adds its runner module here.
"""
