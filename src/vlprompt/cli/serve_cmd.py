"""``vlprompt serve INDEX_DIR [--host 127.0.0.1 --port 8000]``: a web page to search an index.

Open http://127.0.0.1:8000, type a description, and see the top results as thumbnails (videos as a strip of
frames) with their cosine similarity. Binds to 127.0.0.1 by default: only this machine can reach it.
"""

from __future__ import annotations

import argparse
import ipaddress

from vlprompt.errors import ConfigError
from vlprompt.index.service import MAX_BATCH, MAX_QUEUE  # starlette and uvicorn are imported only to serve


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a search page for an index", description=__doc__)
    p.add_argument("index", help="index folder (from `vlprompt index build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--media-root", default=None, help="where the indexed media are now, if moved since the build")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help=f"searches that may wait for the encoder; more get a 503 (default {MAX_QUEUE})")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"searches encoded together at most (default {MAX_BATCH})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the query encoder (default: every core but one)")
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from vlprompt.index.service import serve

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}")
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}: other machines can query this index and see its media")
    print(f"serving {args.index} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    for name in ("max_queue", "max_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    serve(args.index, args.host, args.port, args.device, args.media_root, args.log_level, args.max_queue,
          args.max_batch, args.threads)  # fmt: skip
    return 0
