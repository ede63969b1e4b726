"""Run the chosen demo sections: print their table and write ``report.html`` + ``results.json``.

Each row trains (or evaluates) one recipe from ``configs/world/`` on the embedded world. The demo shows
the headline rows; ``--full`` runs every row (all shifted domains).
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vlprompt.core.factory import resolve_device
from vlprompt.core.rundir import environment
from vlprompt.data.world import build_world, layout
from vlprompt.demo.sections import DEFAULT_SECTIONS, NOTES, SECTIONS, Row
from vlprompt.reports.pages import (
    DIRECTIONS,
    Panel,
    bar_panels,
    environment_html,
    glossary_html,
    html_table,
    mean_std_cell,
    now_utc,
    side_by_side,
    write_report,
)


def ensure_world(world: Path, console: Console) -> None:
    """Build the default world unless a complete one is already there."""
    if layout.manifest_file(world).exists():
        return
    console.print(f"building the embedded world in {world} ...")
    summary = build_world(world, seed=0, size="default", workers=2)
    console.print(f"world built in {summary.get('seconds', '?')} s")


def _columns(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.metrics))


def print_table(rows: list[Row], console: Console) -> None:
    """The results in the terminal, one table per section."""
    for section in dict.fromkeys(r.section for r in rows):
        part = [r for r in rows if r.section == section]
        metrics = _columns(part)
        table = Table(title=section)
        for col in ("method", "domain", *metrics, "trainable", "time (s)"):
            table.add_column(col, justify="left" if col in ("method", "domain") else "right")
        for r in part:
            cells = (f"{r.metrics[m]:.1f}" if m in r.metrics else "-" for m in metrics)
            table.add_row(r.method, r.domain, *cells, f"{r.trainable:,}", f"{r.seconds:.1f}")
        console.print(table)


#: Row columns that are not scores (kept out of the plots).
NOT_PLOTTED = ("ms/sample",)


def _panel_of(key: str, keys: list[str]) -> tuple[str, str]:
    """(panel title, bar group label) of a demo column: the R@K of one direction share a panel (R@1, R@5, R@10),
    another measure gets a panel over its directions (R@1: t2i, i2t), forgetting (lower is better) its own."""
    direction, _, measure = key.partition("/")
    if measure and direction in DIRECTIONS:
        if measure.startswith("R@") and sum(k.startswith(f"{direction}/R@") for k in keys) > 1:
            return f"{DIRECTIONS[direction]} ({direction})", measure
        return measure, direction
    if "forget" in key.lower() or key == "FFM":
        return "forgetting", key
    others = [k for k in keys if "/" not in k and "forget" not in k.lower() and k != "FFM"]
    return (", ".join(others) if len(others) <= 3 else "scores"), key


def section_panels(part: list[Row]) -> list[Panel]:
    """Every score of a demo section as bars (one per method), with the chance level where the data defines one.

    One tested domain: one panel per direction (R@1, R@5, R@10 side by side) or per measure. Several domains
    (``--full``): the domains side by side, one panel per panel-leading score (e.g. R@1 of each direction)."""
    keys = [k for k in _columns(part) if k not in NOT_PLOTTED]
    methods = list(dict.fromkeys(r.method for r in part))
    domains = list(dict.fromkeys(r.domain for r in part))
    layout_: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        title, group = _panel_of(k, keys)
        layout_.setdefault(title, []).append((k, group))

    def value(method: str, domain: str, key: str) -> float:
        return next((float(r.metrics[key]) for r in part if r.method == method and r.domain == domain
                     and key in r.metrics), math.nan)  # fmt: skip

    def chance(domain: str, key: str) -> float:
        return next((r.extra["chance"][key] for r in part if r.domain == domain and key in r.extra.get("chance", {})),
                    math.nan)  # fmt: skip

    panels = []
    for title, members in layout_.items():
        lower = title == "forgetting"
        if len(domains) == 1:
            d = domains[0]
            series = {m: [value(m, d, k) for k, _ in members] for m in methods}
            chances = [chance(d, k) for k, _ in members]
            panels.append(Panel(title, [g for _, g in members], series, "%", chances, lower_is_better=lower))
        else:
            k = members[0][0]
            series = {m: [value(m, d, k) for d in domains] for m in methods}
            panels.append(Panel(f"{title}: {k}" if title != k else k, domains, series, "%",
                                [chance(d, k) for d in domains], lower_is_better=lower))  # fmt: skip
    return panels


def demo_environment() -> dict[str, Any]:
    """The environment the demo ran in (as a run directory's env.json records it) and the device it used."""
    return {**environment(0), "device": str(resolve_device("auto"))}


def report(rows: list[Row], out: Path, seconds: float | None = None) -> Path:
    """Write ``out/report.html`` and ``out/results.json``.

    Per section: the table (with a chance row), bars of every score per method and domain with chance levels,
    and the section's own figures (e.g. accuracy matrices); then the environment and what every column means.
    """
    saved = [{**asdict(r), "extra": {k: v for k, v in r.extra.items() if k != "figures"}} for r in rows]
    (out / "results.json").write_text(json.dumps(saved, indent=2) + "\n")
    sections = []
    for section in dict.fromkeys(r.section for r in rows):
        part = [r for r in rows if r.section == section]
        metrics = _columns(part)
        flat = [{"method": r.method, "domain": r.domain, **r.metrics, "trainable": r.trainable, "time (s)": r.seconds}
                for r in part]  # fmt: skip
        for domain in dict.fromkeys(r.domain for r in part):
            chance = next((r.extra["chance"] for r in part if r.domain == domain and r.extra.get("chance")), {})
            if chance:
                cells = {k: mean_std_cell(chance[k], None, 1) for k in metrics if k in chance}
                flat.append({"method": "chance (random ranking)", "domain": domain, **cells})
        table = html_table(flat, ["method", "domain", *metrics, "trainable", "time (s)"])
        plots = bar_panels(section_panels(part))  # the section's heading is right above
        own = side_by_side([tuple(f) for r in part for f in r.extra.get("figures", [])])
        # a section may attach its own plots (e.g. continual accuracy heatmaps): extra["figures"] = [(title, html)]
        note = next((f"<p class='note'>{html.escape(n)}</p>" for p, n in NOTES.items() if section.startswith(p)), "")
        sections.append((section, note + table + plots + own))
    sections.append(("environment", environment_html([("this demo", demo_environment())])))
    names = [*(k for r in rows for k in r.metrics), "trainable"]  # "time (s)" of a demo row: DEMO_TERMS
    sections.append(("what the numbers mean", glossary_html(names, DEMO_TERMS)))
    took = f", in {seconds:.0f} s" if seconds is not None else ""
    intro = (f"<p class='note'>Run {now_utc()}{took} on the embedded world (procedurally drawn images, captions and "
             "videos): zero-shot against adapted, one section per task. Bars: every score per method; dashed: "
             "chance level.</p>")  # fmt: skip
    return write_report(out / "report.html", "vlprompt demo", sections, intro)


#: Column names of the demo's own tables that the generic glossary does not know.
DEMO_TERMS = [
    ("domain", "the world's rendering of the test images (clean, sketch, noisy, ...), or the task's data."),
    ("time (s)", "wall-clock seconds of the row: training and evaluating (TTA rows: the whole run)."),
]


def run_demo(
    world: Path,
    out: Path,
    full: bool = False,
    progress: bool = True,
    overrides: list[str] | None = None,
    sections: tuple[str, ...] = DEFAULT_SECTIONS,
) -> list[Row]:
    """Build what is missing, run the demo rows of ``sections``, print the table and write the report.

    ``overrides`` (``key=value``) apply to every recipe, e.g. ``train.epochs=1`` for a quick look.
    """
    console = Console(width=max(120, Console().width))  # the table needs ~110 columns, also in logs
    start = time.perf_counter()
    ensure_world(world, console)
    out.mkdir(parents=True, exist_ok=True)
    ctx = {"out": out, "progress": progress, "overrides": list(overrides or []), "console": console}
    rows = []
    for name in sections:
        rows += SECTIONS[name](world, full, ctx)
    print_table(rows, console)
    path = report(rows, out, time.perf_counter() - start)
    console.print(f"report: {path}   total {time.perf_counter() - start:.0f} s")
    return rows
