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
from vlprompt.engine.demo_cil import cil_rows
from vlprompt.engine.demo_continual import continual_rows
from vlprompt.engine.demo_rvlr import rvlr_rows
from vlprompt.engine.demo_tta import tta_rows
from vlprompt.engine.report import bar_chart, html_table, write_report
from vlprompt.engine.runner import evaluate_target
from vlprompt.engine.trainer import train

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "world"
METRICS = ("t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10")
VIDEO_METRICS = ("t2v/R@1", "t2v/R@5", "t2v/R@10", "v2t/R@1", "v2t/R@5", "v2t/R@10", "t2v/order_acc")


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


def run_recipe(recipe: str, out: Path, run_name: str, progress: bool, overrides: list[str]) -> tuple[dict, float]:
    """Train (or just evaluate) one recipe of ``configs/world``; returns (result, seconds)."""
    overrides = [f"out_dir={out}", f"run_name={run_name}", "resume=true", *overrides]
    cfg_path = CONFIGS / f"{recipe}.yaml"
    cfg = load_config(cfg_path, overrides)
    start = time.perf_counter()
    if cfg.method["name"] == "zeroshot":  # nothing to train: evaluate the frozen model
        return {"test": evaluate_target(cfg_path, overrides), "params": {"trainable": 0}}, time.perf_counter() - start
    return train(cfg, progress=progress), time.perf_counter() - start


def section_rows(
    section: str, recipes: list[str], data: list[str], label: str, metrics: tuple[str, ...], ctx: dict[str, Any]
) -> list[Row]:
    """Run ``recipes`` with the data overrides ``data`` and collect one row each."""
    rows = []
    for recipe in recipes:
        method = recipe.split("_", 1)[1]
        ctx["console"].print(f"[bold]{section}[/bold]: {method} ({label}) ...")
        result, seconds = run_recipe(recipe, ctx["out"], f"{recipe}_{label}", ctx["progress"], data + ctx["overrides"])
        test = result["test"]
        row = Row(section, method, label, {k: test[k] for k in metrics if k in test}, result["params"]["trainable"],
                  round(seconds, 1))  # fmt: skip
        rows.append(row)
    return rows


def retrieval_shift_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """Zero-shot vs CoOp vs VPT-deep vs MaPLe on image-text retrieval in shifted domains."""
    rows = []
    for domain in layout.SHIFTED_DOMAINS if full else ("sketch",):
        data = [f"data.root={world}", f"data.train=retrieval/train_{domain}.json",
                f"data.val=retrieval/val_{domain}.json", f"data.test=retrieval/test_{domain}.json"]  # fmt: skip
        recipes = ["shift_zeroshot", "shift_coop", "shift_vpt", "shift_maple"]
        rows += section_rows("retrieval under domain shift", recipes, data, domain, METRICS, ctx)
    return rows


def video_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """Order-sensitive text-video retrieval: meanP (zero-shot, fine-tuned) vs DGL-Linear vs DGL-Transformer."""
    recipes = ["video_zeroshot", "video_meanp", "video_dgl_linear", "video_dgl_transformer"]
    if not full:
        recipes = ["video_zeroshot", "video_dgl_transformer"]
    data = [f"data.root={layout.video_root(world)}"]
    return section_rows("order-sensitive text-video retrieval", recipes, data, "video", VIDEO_METRICS, ctx)


#: Demo sections by name. ``make demo`` runs DEFAULT_SECTIONS; the video rows join it once measured within its bound.
SECTIONS = {
    "retrieval": retrieval_shift_rows,
    "video": video_rows,
    "rvlr": rvlr_rows,
    "continual": continual_rows,
    "tta": tta_rows,
    "cil": cil_rows,
}
DEFAULT_SECTIONS = ("retrieval",)


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


def report(rows: list[Row], out: Path) -> Path:
    """Write ``out/report.html`` (a table and a plot per section) and ``out/results.json``."""
    saved = [{**asdict(r), "extra": {k: v for k, v in r.extra.items() if k != "figures"}} for r in rows]
    (out / "results.json").write_text(json.dumps(saved, indent=2) + "\n")
    sections = []
    for section in dict.fromkeys(r.section for r in rows):
        part = [r for r in rows if r.section == section]
        metrics = _columns(part)
        flat = [{"method": r.method, "domain": r.domain, **r.metrics, "trainable": r.trainable, "time (s)": r.seconds}
                for r in part]  # fmt: skip
        sections.append((section, html_table(flat, ["method", "domain", *metrics, "trainable", "time (s)"])))
        key = metrics[0]
        domains = list(dict.fromkeys(r.domain for r in part))
        methods = list(dict.fromkeys(r.method for r in part))
        series = {
            m: [next((r.metrics[key] for r in part if r.method == m and r.domain == d), 0.0) for d in domains]
            for m in methods
        }
        sections.append((f"{section}: {key}", bar_chart(domains, series, key, section)))
        # a section may attach its own plots (e.g. continual accuracy heatmaps): extra["figures"] = [(title, html)]
        sections += [tuple(f) for r in part for f in r.extra.get("figures", [])]
    return write_report(out / "report.html", "vlprompt demo", sections)


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
    path = report(rows, out)
    console.print(f"report: {path}   total {time.perf_counter() - start:.0f} s")
    return rows
