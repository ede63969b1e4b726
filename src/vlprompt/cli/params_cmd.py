"""``vlprompt params CONFIG [key=value ...]``: trainable and total parameter counts without training.

Class-incremental configs are counted as the runner builds them (task count, label space, heads; class names are
read, images are not): ``trainable`` is what one task trains, plus each task's count and what the whole run trains.
"""

from __future__ import annotations

import argparse
import json

from vlprompt.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="count a config's trainable parameters", description=__doc__)
    add_config_args(p)
    p.add_argument("--json", action="store_true", help='print {"trainable": N, "total": M}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlprompt.config import load_config
    from vlprompt.core.factory import build_model
    from vlprompt.runners.cil import class_incremental_counts, is_class_incremental

    cfg = load_config(args.config, args.overrides)
    cfg.backbone.pretrained = None  # counting needs the architecture only, never the weights
    if is_class_incremental(cfg):
        counts = class_incremental_counts(cfg)
    else:
        counts = build_model(cfg, torch.device("cpu")).parameter_counts()
    if args.json:
        print(json.dumps(counts))
        return 0
    share = 100 * counts["trainable"] / max(counts["total"], 1)
    if "trainable_per_task" not in counts:
        print(f"trainable {counts['trainable']:,} of {counts['total']:,} ({share:.3f}%)")
        return 0
    per_task = sorted(set(counts["trainable_per_task"]))
    each = f"{per_task[0]:,}" if len(per_task) == 1 else ", ".join(f"{n:,}" for n in counts["trainable_per_task"])
    print(
        f"trainable per task {each} ({counts['tasks']} tasks; task 1: {share:.3f}% of {counts['total']:,});"
        f" over the whole run {counts['trainable_over_run']:,}"
    )
    return 0
