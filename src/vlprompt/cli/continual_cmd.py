"""``vlprompt continual CONFIG [key=value ...]``: train a task sequence one task at a time, evaluating every seen task.

Writes ``RUN_DIR/continual.json`` (accuracy matrices, summaries with their definitions) and ``RUN_DIR/report.html``
(heatmaps). ``resume=true`` restarts a killed run at the task it was in. ``--build-coco COCO_ROOT OUT_DIR`` writes
the COCO continual split (LPI's 12 super-category tasks) from the COCO 2014 captions and instances annotations.
The method picks the runner: a class-incremental method runs ``runners/cil.py``, a grounding method (a
``GroundingMethod``: ``zeroshot_ground``, ``lpi_ground``, ...) ``runners/grounding.py``, any other continual retrieval.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("continual", help="continual retrieval, classification or grounding over a task sequence",
                       description=__doc__)  # fmt: skip
    p.add_argument("config", nargs="?", help="YAML config (see configs/, e.g. configs/lpi_coco_vitb16.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. continual.oracle_task=true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--build-coco", nargs=2, metavar=("COCO_ROOT", "OUT_DIR"), help="write the COCO continual split")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.errors import ConfigError

    if args.build_coco:
        from vlprompt.data.continual import build_coco_continual

        print(json.dumps(build_coco_continual(*args.build_coco), indent=1))
        return 0
    if not args.config:
        raise ConfigError("give a config file (or --build-coco COCO_ROOT OUT_DIR)")
    from vlprompt.config import load_config
    from vlprompt.core.rundir import run_dir_for
    from vlprompt.runners.continual import run_continual

    cfg = load_config(args.config, args.overrides)
    # Class-incremental classification (issue 7): configs whose method is a class-incremental one (itprompt,
    # l2p_cil, dualprompt, coda_prompt, hide_prompt, zeroshot_cil) run in vlprompt.runners.cil instead.
    from vlprompt.runners.cil import is_class_incremental

    if is_class_incremental(cfg):
        from vlprompt.runners.cil import print_cil_summary, run_class_incremental

        results = run_class_incremental(cfg, progress=not args.quiet, log=None if args.json else print)
        if args.json:
            print(json.dumps({"summary": results["summary"], "params": results["params"]}, sort_keys=True))
        else:
            print_cil_summary(results, str(run_dir_for(cfg)))
        return 0
    # Referring-expression grounding (issue 16): configs whose method is a GroundingMethod (zeroshot_ground,
    # lpi_ground, ...) run in vlprompt.runners.grounding; P@1 matrices instead of R@1.
    from vlprompt.runners.grounding import is_grounding

    metrics = ("i2t/R@1", "t2i/R@1")
    if is_grounding(cfg):
        from vlprompt.runners.grounding import run_continual_grounding

        results = run_continual_grounding(cfg, progress=not args.quiet, log=None if args.json else print)
        metrics = ("rec/P@1", "route/acc")
    else:
        results = run_continual(cfg, progress=not args.quiet, log=None if args.json else print)
    if args.json:
        print(json.dumps({"summary": results["summary"], "params": results["params"]}, sort_keys=True))
        return 0
    _print_summary(results, str(run_dir_for(cfg)), metrics)
    return 0


def _print_summary(results: dict, title: str, metrics: tuple[str, ...] = ("i2t/R@1", "t2i/R@1")) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from vlprompt.eval.continual import DEFINITIONS

    console = Console(width=max(120, Console().width))
    names = [t["name"] for t in results["tasks"]]
    for metric in (m for m in metrics if m in results["matrices"]):
        table = Table(title=f"{metric}: task (column) after training session (row)")
        table.add_column("after")
        for n in names:
            table.add_column(n, justify="right")
        for i, row in enumerate(results["matrices"].get(metric, [])):
            table.add_row(names[i], *("-" if v is None else f"{v:.1f}" for v in row))
        console.print(table)
    table = Table(title=title)
    table.add_column("metric")
    for measure in DEFINITIONS:
        table.add_column(measure, justify="right")
    for metric in sorted(results["matrices"], key=_natural):
        cells = [results["summary"].get(f"cl/{metric}/{m}") for m in DEFINITIONS]
        table.add_row(metric, *("-" if v is None else f"{v:.2f}" for v in cells))
    console.print(table)
    console.print(f"trainable parameters per task: {results['params']['trainable_per_task']:,}")
    for measure, text in DEFINITIONS.items():
        console.print(f"[dim]{measure}: {escape(text)}[/dim]")


def _natural(metric: str) -> tuple[str, int]:
    """``i2t/R@5`` before ``i2t/R@10``."""
    head, _, k = metric.partition("@")
    return head, int(k) if k.isdigit() else 0
