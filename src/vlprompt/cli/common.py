"""Helpers shared by subcommands: config arguments and printing results."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``CONFIG [key=value ...]`` positional arguments."""
    parser.add_argument("config", nargs=None if required else "?", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=0.01 data.root=/data/coco")


def print_metrics(metrics: dict[str, Any], as_json: bool = False, title: str = "metrics") -> None:
    """Print a flat or nested metrics dict as JSON or a table."""
    if as_json:
        print(json.dumps(metrics, indent=None, sort_keys=True))
        return
    table = Table(title=title)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in _flatten(metrics).items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
