"""``vlprompt report RUN_DIR...``: an HTML report over finished runs, mean ± std when several seeds are given."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="HTML report (tables and plots) of finished runs",
        description="Metrics tables and plots of train, eval (--out), continual and TTA run directories. Runs that "
        "differ only in their seed are aggregated as mean ± std; every run is labelled by the data its config tested "
        "on; TTA runs are compared with the 0-step run of the same data, backbone and direction; each page shows "
        "chance levels, what every metric means, the environment (env.json) and the date.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write (default: report.html)")
    p.add_argument("--title", default="vlprompt report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.reports.runs import write_run_report

    path = write_run_report(args.runs, args.out, args.title)
    print(f"report: {path}")
    return 0
