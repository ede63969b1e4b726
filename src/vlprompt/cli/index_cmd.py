"""``vlprompt index build|info|bench``: embed a dataset with a model and build a FAISS search index.

``vlprompt index build --model RUN_DIR_OR_CONFIG_OR_BACKBONE --data DATA --out INDEX_DIR [key=value ...]``

``--data`` is a run directory or YAML config (its ``data`` section; ``--split`` picks the file, default test), an
annotation file (``--format``, default karpathy; ``--root``: the folder its paths are relative to; without it a
Karpathy file's images resolve as in every command, see README "Real data layout"), or a folder of images and
videos. Without ``--data`` the model's config gives it. Building again with the same arguments resumes an
interrupted extraction; another ``--kind`` reuses the embeddings. ``vlprompt index info INDEX_DIR`` describes
an index and checks its caches (``--verify``: their checksums too); ``vlprompt index bench INDEX_DIR`` measures
query latency and agreement with exact search, using the items' own captions as queries.
"""

from __future__ import annotations

import argparse

from vlprompt.cli.common import print_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build a FAISS search index of a dataset", description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="embed a dataset and build an index (resumable)")
    b.add_argument("--model", required=True, help="run directory, exported folder, hf-hub:ORG/NAME, YAML config, "
                   "or backbone name (with --pretrained)")
    b.add_argument("--pretrained", default=None, help="weights tag/path for a backbone name ('none' = random init)")
    b.add_argument("--data", default=None, help="config, run directory, annotation file or media folder")
    b.add_argument("--split", default="test", choices=["train", "val", "test"], help="which annotation file")
    b.add_argument("--format", default=None, help="format of an annotation file given as --data (default karpathy)")
    b.add_argument("--root", default=None, help="folder the annotation file's media paths are relative to")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--modality", default="visual", choices=["visual", "text"], help="index images/videos or captions")
    b.add_argument("--kind", default="flat", choices=["flat", "hnsw", "ivfpq"], help="flat = exact search")
    b.add_argument("--hnsw-m", type=int, default=None, help="hnsw: graph degree (default 32)")
    b.add_argument("--ef-construction", type=int, default=None, help="hnsw: build breadth (default 200)")
    b.add_argument("--ef-search", type=int, default=None, help="hnsw: search breadth (default 128)")
    b.add_argument("--nlist", type=int, default=None, help="ivfpq: inverted lists (default ~4 sqrt(n))")
    b.add_argument("--pq-m", type=int, default=None, help="ivfpq: sub-quantisers, divides the dim (default dim/8)")
    b.add_argument("--pq-bits", type=int, default=None, help="ivfpq: bits per code (default 8)")
    b.add_argument("--nprobe", type=int, default=None, help="ivfpq: lists visited per query (default 16)")
    b.add_argument("--rerank", type=int, default=None, help="ivfpq: re-score rerank x k candidates exactly (4)")
    b.add_argument("--num-frames", type=int, default=None, help="frames per video (default: data.num_frames or 12)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--shard-size", type=int, default=4096, help="rows per cache shard (a crash loses at most one)")
    b.add_argument("--dtype", default="float32", choices=["float16", "float32"], help="stored embedding precision")
    b.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"], help="encoder precision")
    b.add_argument("--device", default="auto")
    b.add_argument("--overwrite", action="store_true", help="replace embeddings of another model or dataset")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("overrides", nargs="*", help="key=value overrides of the model's and data's configs")
    b.set_defaults(func=run_build)
    i = actions.add_parser("info", help="describe an index folder and check its feature caches")
    i.add_argument("index", help="index folder")
    i.add_argument("--verify", action="store_true", help="also compare every cache shard's sha256 (reads them all)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run_info)
    m = actions.add_parser("bench", help="query latency and agreement with exact search")
    m.add_argument("index", help="index folder")
    m.add_argument("-k", type=int, default=10)
    m.add_argument("--queries", type=int, default=1000, help="at most this many of the items' captions")
    m.add_argument("--device", default="auto")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_bench)


def run_build(args: argparse.Namespace) -> int:
    from vlprompt.index.build import build_index

    params = {
        "M": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
        "nlist": args.nlist,
        "m": args.pq_m,
        "nbits": args.pq_bits,
        "nprobe": args.nprobe,
        "rerank": args.rerank,
    }
    given = {k: v for k, v in params.items() if v is not None}

    def progress(kind: str, done: int, total: int) -> None:
        if not args.quiet:
            print(f"{kind}: {done}/{total} embedded", flush=True)

    manifest = build_index(
        args.out,
        args.model,
        args.data,
        pretrained=args.pretrained,
        split=args.split,
        fmt=args.format,
        root=args.root,
        modality=args.modality,
        kind=args.kind,
        params=given,
        overrides=args.overrides,
        device=args.device,
        num_frames=args.num_frames,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        autocast=args.autocast,
        overwrite=args.overwrite,
        progress=progress,
    )
    t = manifest["timing"]
    skipped = f", {len(manifest['skipped'])} unreadable skipped" if manifest["skipped"] else ""
    print(
        f"{args.out}: {manifest['count']} {'/'.join(manifest['kinds'])} items x {manifest['dim']}, "
        f"{manifest['index']['kind']} index{skipped} (embeddings {t['extract_s']:.1f} s, index {t['index_s']:.2f} s)"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the manifest's summary, then check the caches: a damaged index is described, then reported."""
    from pathlib import Path

    from vlprompt.index.build import open_caches
    from vlprompt.index.search import read_manifest

    m = read_manifest(args.index)
    summary = {
        "items": m["count"],
        "kinds": "/".join(m["kinds"]),
        "modality": m["modality"],
        "dim": m["dim"],
        "index": m["index"]["kind"],
        **{f"index.{k}": v for k, v in m["index"]["params"].items()},
        "model": f"{m['model']['kind']} {m['model']['target']}",
        **{f"data.{k}": v for k, v in m["data"].items()},
        "media_root": m["media_root"],
        "skipped": len(m["skipped"]),
        "created": m["created"],
    }
    print_metrics(summary, args.json, title=str(args.index))
    for cache in open_caches(Path(args.index), m).values():  # DataError (printed by main) if one is damaged
        if args.verify:
            cache.verify(deep=True)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from vlprompt.index.search import SearchIndex, benchmark, index_queries

    index = SearchIndex(args.index, args.device)
    result = benchmark(index, index_queries(index, args.queries), args.k)
    if not args.json:  # milliseconds need more than the table's two decimals
        result = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in result.items()}
    print_metrics(result, args.json, title=f"{args.index} ({index.kind})")
    return 0
