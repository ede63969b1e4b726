"""``vlprompt demo [--full]``: the embedded world end to end (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded-world demo table and report", description=__doc__)
    p.add_argument("--world", type=Path, default=Path("world"), help="world folder (built if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where runs and the report go")
    p.add_argument("--full", action="store_true",
                   help="every section and every row (all domains, all variants), not just the headline")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--sections", default=None,
                   help="comma-separated sections: retrieval, video, continual, cil, tta, rvlr, caption, grounding "
                        "(default: the headline sections; with --full: all)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every recipe (e.g. train.epochs=1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.demo import DEFAULT_SECTIONS, SECTIONS, run_demo
    from vlprompt.errors import ConfigError

    if args.sections:
        sections = tuple(args.sections.split(","))
    else:
        sections = tuple(SECTIONS) if args.full else DEFAULT_SECTIONS
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo section(s) {unknown}; known: {', '.join(SECTIONS)}")
    run_demo(args.world, args.out, args.full, not args.quiet, args.overrides, sections)
    return 0
