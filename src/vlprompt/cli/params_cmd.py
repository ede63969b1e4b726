"""``vlprompt params CONFIG [key=value ...]``: trainable and total parameter counts without training."""

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
    from vlprompt.engine.trainer import build_model

    cfg = load_config(args.config, args.overrides)
    cfg.backbone.pretrained = None  # counting needs the architecture only, never the weights
    counts = build_model(cfg, torch.device("cpu")).parameter_counts()
    if args.json:
        print(json.dumps(counts))
    else:
        share = 100 * counts["trainable"] / max(counts["total"], 1)
        print(f"trainable {counts['trainable']:,} of {counts['total']:,} ({share:.3f}%)")
    return 0
