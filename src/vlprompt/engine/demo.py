"""``make demo``: the embedded world end to end, zero-shot vs adapted, as a table and an HTML report.

Each row trains (or evaluates) one recipe from ``configs/world/`` on the embedded world. The demo shows
the headline rows; ``--full`` runs every row (all shifted domains).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vlprompt.config import load_config
from vlprompt.data.world import build_world, layout
from vlprompt.engine.report import bar_chart, html_table, write_report
from vlprompt.engine.runner import evaluate_target
from vlprompt.engine.trainer import train

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "world"
METRICS = ("t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10")


@dataclass
class Row:
    """One line of the demo table."""

    section: str
    method: str
    domain: str
    metrics: dict[str, float]
    trainable: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def ensure_world(world: Path, console: Console) -> None:
    """Build the default world unless a complete one is already there."""
    if layout.manifest_file(world).exists():
        return
    console.print(f"building the embedded world in {world} ...")
    summary = build_world(world, seed=0, size="default", workers=2)
    console.print(f"world built in {summary.get('seconds', '?')} s")


def run_recipe(
    recipe: str, world: Path, out: Path, domain: str, progress: bool, overrides: list[str]
) -> tuple[dict[str, Any], float]:
    """Train (or just evaluate) one world recipe on ``domain``; returns (result, seconds)."""
    overrides = [
        f"data.root={world}",
        f"data.train=retrieval/train_{domain}.json",
        f"data.val=retrieval/val_{domain}.json",
        f"data.test=retrieval/test_{domain}.json",
        f"out_dir={out}",
        f"run_name={recipe}_{domain}",
        "resume=true",
        *overrides,
    ]
    cfg_path = CONFIGS / f"{recipe}.yaml"
    cfg = load_config(cfg_path, overrides)
    start = time.perf_counter()
    if cfg.method["name"] == "zeroshot":  # nothing to train: evaluate the frozen model
        return {"test": evaluate_target(cfg_path, overrides), "params": {"trainable": 0}}, time.perf_counter() - start
    return train(cfg, progress=progress), time.perf_counter() - start


def retrieval_shift_rows(
    world: Path, out: Path, full: bool, progress: bool, overrides: list[str], console: Console
) -> list[Row]:
    """Zero-shot vs CoOp vs VPT-deep vs MaPLe on image-text retrieval in shifted domains."""
    domains = layout.SHIFTED_DOMAINS if full else ("sketch",)
    rows = []
    for domain in domains:
        for recipe in ("shift_zeroshot", "shift_coop", "shift_vpt", "shift_maple"):
            console.print(f"[bold]{recipe}[/bold] on {domain} ...")
            result, seconds = run_recipe(recipe, world, out, domain, progress, overrides)
            rows.append(
                Row(
                    "retrieval under domain shift",
                    recipe.removeprefix("shift_"),
                    domain,
                    {k: result["test"][k] for k in METRICS},
                    result["params"]["trainable"],
                    round(seconds, 1),
                )
            )
    return rows


def print_table(rows: list[Row], console: Console) -> None:
    """The results in the terminal, one table per section."""
    for section in dict.fromkeys(r.section for r in rows):
        table = Table(title=section)
        for col in ("method", "domain", *METRICS, "trainable", "time (s)"):
            table.add_column(col, justify="left" if col in ("method", "domain") else "right")
        for r in (r for r in rows if r.section == section):
            cells = (f"{r.metrics[m]:.1f}" for m in METRICS)
            table.add_row(r.method, r.domain, *cells, f"{r.trainable:,}", f"{r.seconds:.1f}")
        console.print(table)


def report(rows: list[Row], out: Path) -> Path:
    """Write ``out/report.html`` and ``out/results.json``."""
    flat = [
        {
            "section": r.section,
            "method": r.method,
            "domain": r.domain,
            **r.metrics,
            "trainable": r.trainable,
            "time (s)": r.seconds,
        }
        for r in rows
    ]
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    domains = sorted({r.domain for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    series = {
        m: [next((r.metrics["t2i/R@1"] for r in rows if r.method == m and r.domain == d), 0.0) for d in domains]
        for m in methods
    }
    sections = [
        ("Results", html_table(flat, ["section", "method", "domain", *METRICS, "trainable", "time (s)"])),
        ("Text-to-image R@1 by domain", bar_chart(domains, series, "t2i R@1", "retrieval under domain shift")),
    ]
    return write_report(out / "report.html", "vlprompt demo", sections)


def run_demo(
    world: Path, out: Path, full: bool = False, progress: bool = True, overrides: list[str] | None = None
) -> list[Row]:
    """Build what is missing, run every demo row, print the table and write the report.

    ``overrides`` (``key=value``) apply to every recipe, e.g. ``train.epochs=1`` for a quick look.
    """
    console = Console(width=max(120, Console().width))  # the table needs ~110 columns, also in logs
    start = time.perf_counter()
    ensure_world(world, console)
    out.mkdir(parents=True, exist_ok=True)
    rows = retrieval_shift_rows(world, out, full, progress, list(overrides or []), console)
    print_table(rows, console)
    path = report(rows, out)
    console.print(f"report: {path}   total {time.perf_counter() - start:.0f} s")
    return rows
