"""``vlprompt list backbones|methods|datasets``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list backbones, methods or dataset formats", description=__doc__)
    p.add_argument("what", choices=["backbones", "methods", "datasets"])
    p.add_argument("--pretrained", action="store_true", help="backbones: also list open_clip's pretrained tags")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from vlprompt.methods import METHODS

        for name in METHODS.names():
            doc = (METHODS.get(name).__doc__ or "").strip().splitlines()[0]
            print(f"{name:12s} {doc}")
    elif args.what == "datasets":
        from vlprompt.data import DATASET_FORMATS

        for name, doc in sorted(DATASET_FORMATS.items()):
            print(f"{name:12s} {doc}")
    else:
        import open_clip

        from vlprompt.backbone import EMBEDDED_MODELS, available_backbones

        for name in EMBEDDED_MODELS:
            print(f"{name:28s} embedded (pretrained=world; `vlprompt pretrain --model {name}`)")
        if args.pretrained:
            for name, tag in open_clip.list_pretrained():
                print(f"{name:28s} {tag}")
        else:
            for name in available_backbones():
                if name not in EMBEDDED_MODELS:
                    print(name)
    return 0
