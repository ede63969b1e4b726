"""``vlprompt caption RUN_DIR|CONFIG [key=value ...] (--images FOLDER | --data ANNOTATION.json) [--tta rlcf]``:
caption images with a trained ClipCap / CapDec (or an ``rlcf_caption`` recipe), with or without RLCF's test-time
tuning; writes ``captions.json`` and, where references exist, ``metrics.json`` (per domain for nocaps)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images (ClipCap / CapDec, optionally + RLCF)", description=__doc__)
    p.add_argument("target", help="a run directory, an exported folder, hf-hub:ORG/NAME, or a YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tta.steps=4 method.sample_k=10")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--images", metavar="FOLDER", help="caption every image below this folder")
    what.add_argument("--data", metavar="FILE", help="a Karpathy (COCO / Flickr30K) or COCO-caption / nocaps JSON")
    p.add_argument("--image-root", metavar="DIR", help="folder the annotation file's image paths are relative to")
    p.add_argument("--tta", choices=("none", "rlcf"), help="none: no adaptation; rlcf: RLCF per image "
                   "(default: what the config says)")  # fmt: skip
    p.add_argument("--weights", metavar="RUN", help="with a config: the run directory / export whose mapper to load")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/captions)")
    p.add_argument("--metrics", metavar="LIST", help="comma-separated subset of BLEU-1..4,METEOR,ROUGE-L,CIDEr,SPICE")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.cli.common import print_metrics
    from vlprompt.runners.caption import caption_images

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    summary = caption_images(
        args.target, args.overrides, images=args.images, annotations=args.data, image_root=args.image_root,
        tta=args.tta, weights=args.weights, out=args.out, metrics=metrics,
    )  # fmt: skip
    print_metrics(summary, args.json, title=f"captions -> {summary['out']}")
    return 0
