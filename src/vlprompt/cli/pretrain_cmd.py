"""``vlprompt pretrain``: pretrain an embedded tiny CLIP on a built world's base part."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain an embedded tiny CLIP on the world", description=__doc__)
    p.add_argument("--model", default="vlprompt-tiny", help="vlprompt-tiny or vlprompt-small")
    p.add_argument("--world", type=Path, required=True, help="a world built with `vlprompt world build`")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the user cache)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where the training run directory goes")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from vlprompt.backbone.loading import cache_dir
    from vlprompt.engine.pretrain import pretrain_embedded

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
