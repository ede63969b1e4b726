"""``vlprompt video compress IN OUT [--fps 3] [--short-side 224] [--workers N]``: pre-compress videos."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("video", help="video preprocessing", description=__doc__)
    vsub = p.add_subparsers(dest="video_command", metavar="ACTION", required=True)
    c = vsub.add_parser(
        "compress",
        help="re-encode a folder of videos to short side 224 at 3 fps (mp4, video stream only)",
        description="Re-encode every video under IN to OUT/<same relative path>.mp4. Unreadable files are "
        "skipped and listed; finished outputs are kept, so an interrupted run can be restarted.",
    )
    c.add_argument("input", type=Path, metavar="IN", help="folder of source videos (searched recursively)")
    c.add_argument("output", type=Path, metavar="OUT", help="output folder")
    c.add_argument("--fps", type=float, default=3, help="output frame rate (default 3)")
    c.add_argument("--short-side", type=int, default=224, help="output short side in pixels (default 224)")
    c.add_argument("--workers", type=int, default=0, help="parallel processes (0 = one per core)")
    c.add_argument("--overwrite", action="store_true", help="re-encode files whose output already exists")
    c.add_argument("--strict", action="store_true", help="exit with status 1 if any file was skipped")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.data.compress import compress_videos

    workers = args.workers if args.workers > 0 else os.cpu_count() or 1

    def progress(rel: str, error: str | None) -> None:
        if error is not None:
            print(f"skipped {rel}: {error}", file=sys.stderr)

    report = compress_videos(
        args.input, args.output, args.fps, args.short_side, workers=workers, overwrite=args.overwrite,
        progress=progress,
    )  # fmt: skip
    done, old, skipped = len(report["done"]), len(report["already_done"]), report["skipped"]
    print(f"compressed {done} video(s) -> {args.output} ({old} already done, {len(skipped)} skipped)")
    return 1 if args.strict and skipped else 0
