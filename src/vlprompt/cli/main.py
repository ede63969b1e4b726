"""Entry point of the ``vlprompt`` console script.

Each subcommand lives in its own module under ``vlprompt.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order they appear in --help.
COMMANDS = [
    "train", "eval", "continual", "tta", "metrics", "params", "list", "features", "index", "search", "serve",
    "report", "export", "world", "pretrain", "demo", "video", "caption",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="vlprompt", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"vlprompt.cli.{name}_cmd")
        except ModuleNotFoundError as err:
            if err.name == f"vlprompt.cli.{name}_cmd":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; user errors print one line, not a traceback."""
    parser = build_parser()
    # key=value overrides may come before or after flags; argparse alone stops at the first flag
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from vlprompt.errors import VlpromptError

    try:
        return int(args.func(args) or 0)
    except VlpromptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
