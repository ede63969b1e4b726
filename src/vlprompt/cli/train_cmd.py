"""``vlprompt train CONFIG [key=value ...]``: train a method and write a run directory."""

from __future__ import annotations

import argparse

from vlprompt.cli.common import add_config_args, print_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method from a config", description=__doc__)
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.config import load_config
    from vlprompt.core import train
    from vlprompt.core.rundir import run_dir_for
    from vlprompt.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    name = cfg.method.get("name")
    if name == "rlcf_caption":
        raise ConfigError("rlcf_caption adapts at test time: run `vlprompt caption CONFIG --weights RUN_DIR`")
    if name in ("clipcap", "capdec"):  # captioners evaluate by captioning, not by retrieval
        from vlprompt.runners.caption import train_captioner

        result = train_captioner(cfg, progress=not args.quiet)
    else:
        result = train(cfg, progress=not args.quiet)
    print_metrics(result, args.json, title=f"{run_dir_for(cfg)}")
    return 0
