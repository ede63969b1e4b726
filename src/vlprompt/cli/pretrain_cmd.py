"""``vlprompt pretrain CONFIG [key=value ...]``: contrastive pre-training / full fine-tuning of a whole CLIP.

CONFIG is a training config whose method is ``finetune`` (open_clip's CLIP loss and recipe through vlprompt's
trainer; ``backbone.pretrained: null`` = random initialisation) on any supported dataset; the run directory it
writes serves as a backbone afterwards (``backbone.pretrained=RUN_DIR``), and ``--export FILE`` also writes the
model as an open_clip checkpoint. ``vlprompt pretrain --model vlprompt-tiny --world WORLD`` is the recipe of the
shipped embedded CLIPs (the world's base part, exported in the compact embedded format with a model card).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlprompt.cli.common import add_config_args, print_metrics
from vlprompt.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="contrastive pre-training / full fine-tuning of a CLIP (any dataset config, or the embedded world)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, required=False)
    p.add_argument(
        "--export", type=Path, default=None, help="with CONFIG: also write the model as an open_clip .safetensors file"
    )
    p.add_argument("--json", action="store_true", help="with CONFIG: print the final metrics as JSON")
    world = p.add_argument_group("the embedded models' recipe (instead of CONFIG)")
    world.add_argument("--world", type=Path, default=None, help="a world built with `vlprompt world build`")
    world.add_argument("--model", default="vlprompt-tiny", help="vlprompt-tiny or vlprompt-small")
    world.add_argument("--out", type=Path, default=None, help="output folder (default: the user cache)")
    world.add_argument("--steps", type=int, default=1500)
    world.add_argument("--batch-size", type=int, default=256)
    world.add_argument("--lr", type=float, default=1e-3)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--runs", type=Path, default=Path("runs"), help="where the training run directory goes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.world is None):
        raise ConfigError("give either a CONFIG (any dataset) or --world WORLD (the embedded models' recipe)")
    return run_config(args) if args.config is not None else run_world(args)


def run_config(args: argparse.Namespace) -> int:
    from vlprompt.config import load_config
    from vlprompt.runners.pretrain import export_full_model, pretrain

    cfg = load_config(args.config, args.overrides)
    result, run_dir = pretrain(cfg, progress=not args.quiet)
    print_metrics(result, args.json, title=str(run_dir))
    if args.export is not None:
        print(f"wrote {export_full_model(run_dir, args.export)} (open_clip checkpoint of {cfg.backbone.name})")
    if not args.json:
        print(f"use it as a backbone: backbone.name={cfg.backbone.name} backbone.pretrained={run_dir}")
    return 0


def run_world(args: argparse.Namespace) -> int:
    import json

    from vlprompt.backbone.loading import cache_dir
    from vlprompt.runners.pretrain import pretrain_embedded

    if args.overrides or args.export is not None:
        raise ConfigError("key=value overrides and --export go with a CONFIG, not with --world")
    out = args.out or cache_dir() / "models"
    card = pretrain_embedded(
        args.model,
        args.world,
        out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.runs,
        progress=not args.quiet,
    )
    print(json.dumps(card["zero_shot"], indent=2))
    print(f"wrote {out / (args.model + '.safetensors')} and its model card")
    return 0
