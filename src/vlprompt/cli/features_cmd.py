"""``vlprompt features extract|info``: cache per-sample features of a frozen encoder (e.g. RVLR's teachers).

``vlprompt features extract CONFIG [key=value ...] --modality image|text --out DIR [--encoder NAME --pretrained TAG]``
reads the config's ``data`` section (``--split``, default train) and stores the encoder's embeddings of every
image (or caption) in a sharded, checksummed cache; ``vlprompt features info DIR`` describes a cache.
"""

from __future__ import annotations

import argparse

from vlprompt.cli.common import add_config_args, print_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="cache per-sample features of a frozen encoder", description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ext = actions.add_parser("extract", help="compute (or resume) a feature cache for a config's split")
    add_config_args(ext)
    ext.add_argument("--modality", required=True, choices=["image", "text"], help="which tower/inputs")
    ext.add_argument("--out", required=True, help="cache folder")
    ext.add_argument("--encoder", default="", help="backbone name (default: the config's backbone.name)")
    ext.add_argument("--pretrained", default=None, help="weights tag/path (default: the config's backbone.pretrained)")
    ext.add_argument("--split", default="train", choices=["train", "val", "test"])
    ext.add_argument("--batch-size", type=int, default=256)
    ext.add_argument("--shard-size", type=int, default=8192, help="rows per shard (a crash loses at most one)")
    ext.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ext.add_argument("--overwrite", action="store_true", help="replace a cache of another encoder or dataset")
    ext.add_argument("--quiet", action="store_true")
    ext.set_defaults(func=run_extract)
    info = actions.add_parser("info", help="describe a feature cache")
    info.add_argument("cache", help="cache folder")
    info.add_argument("--verify", action="store_true", help="re-hash every shard")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)


def run_extract(args: argparse.Namespace) -> int:
    from vlprompt.backbone import load_backbone
    from vlprompt.config import load_config
    from vlprompt.core.factory import resolve_device, seed_everything
    from vlprompt.data.features import extract_split_features

    cfg = load_config(args.config, args.overrides)
    seed_everything(cfg.seed)
    name = args.encoder or cfg.backbone.name
    pretrained = args.pretrained if args.pretrained is not None else cfg.backbone.pretrained
    backbone = load_backbone(name, pretrained, device=resolve_device(cfg.device))

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"{done}/{total} {args.modality} features", flush=True)

    cache = extract_split_features(
        cfg.data,
        args.split,
        args.modality,
        args.out,
        backbone,
        encoder=f"{name}@{pretrained}/{args.modality}",
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=progress,
    )
    print(f"{cache.root}: {len(cache)} x {cache.dim} {cache.meta['dtype']} ({cache.encoder})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from vlprompt.data.features import FeatureCache

    cache = FeatureCache(args.cache)
    if args.verify:
        cache.verify(deep=True)
    meta = cache.meta
    summary = {
        "encoder": cache.encoder,
        "modality": cache.modality,
        "rows": len(cache),
        "dim": cache.dim,
        "dtype": meta["dtype"],
        "shards": len(meta["shards"]),
        "index_checksum": cache.checksum,
        "missing": len(cache.missing),
        **({"verified": "all shards match their sha256"} if args.verify else {}),
        **{f"info.{k}": v for k, v in meta.get("info", {}).items()},
    }
    print_metrics(summary, args.json, title=str(cache.root))
    return 0
