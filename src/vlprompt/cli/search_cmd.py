"""``vlprompt search INDEX_DIR "a red star moving left" -k 10``: the top-k items of an index for a query.

The query is a text, or an image or video file with ``--media PATH``; it is encoded by the model that built
the index. Prints rank, cosine similarity, item id and caption (``--json``: one JSON object per line).
"""

from __future__ import annotations

import argparse
import json

from vlprompt.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="query a search index", description=__doc__)
    p.add_argument("index", help="index folder (from `vlprompt index build`)")
    p.add_argument("query", nargs="?", default=None, help="text query")
    p.add_argument("--media", default=None, help="an image or video file to search with instead of a text")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--device", default="auto")
    p.add_argument("--ef-search", type=int, default=None, help="hnsw: search breadth (default: the index's)")
    p.add_argument("--nprobe", type=int, default=None, help="ivfpq: lists visited (default: the index's)")
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.index.search import SearchIndex

    if (args.query is None) == (args.media is None):
        raise ConfigError('give a text query or --media FILE (one of them), e.g. vlprompt search INDEX "a red star"')
    if args.query is not None and not args.query.strip():
        raise ConfigError("the query is empty")
    if args.k < 1:
        raise ConfigError("-k must be at least 1")
    index = SearchIndex(args.index, args.device, ef_search=args.ef_search, nprobe=args.nprobe)
    cut = False
    if args.query is not None:  # one encoder pass tells the hits and whether the query was cut
        (hits,), (cut,) = index.search_batch([args.query], args.k)
    else:
        hits = index.search_media(args.media, args.k)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.as_dict(), ensure_ascii=False))
        return 0
    if cut:
        print(f"note: the model reads only the first {index.max_query_tokens} tokens of the query")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.query or args.media} · {index.kind} index of {len(index)} items")
    for name, justify in (("rank", "right"), ("score", "right"), ("id", "left"), ("caption", "left")):
        table.add_column(name, justify=justify)
    for hit in hits:
        caption = hit.item.get("text") or next(iter(hit.item.get("captions") or []), "")
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.item["id"], caption)
    Console(width=max(100, Console().width)).print(table)
    return 0
