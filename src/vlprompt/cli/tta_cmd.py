"""``vlprompt tta CONFIG [key=value ...]``: episodic test-time adaptation (RLCF, TPT, zero-shot) on a test set."""

from __future__ import annotations

import argparse

from vlprompt.cli.common import add_config_args, print_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tta", help="test-time adaptation (RLCF, TPT) from a config", description=__doc__)
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.config import load_config
    from vlprompt.core.rundir import run_dir_for
    from vlprompt.runners.tta import run_tta

    cfg = load_config(args.config, args.overrides)
    metrics = run_tta(cfg, progress=not args.quiet)
    print_metrics(metrics, args.json, title=f"{run_dir_for(cfg)}")
    return 0
