"""Demo section ``cil``: class-incremental classification on the embedded world's 10-task split.

96 fine classes (24 categories x 4 colours; ~29 training and 5 clean test images each), the world's seeded 10-task
class order (``classification/cil_tasks.json``), no exemplars, task unknown at test time. Rows: zero-shot CLIP (the
frozen tiny CLIP with "a photo of a {class}." anchors), L2P, DualPrompt, CODA-Prompt, IT-Prompt (classifier + TAP,
the ACM paper's figure) and IT-Prompt with the journal's C-NCM classifier, each from ``configs/world/cil_*.yaml`` with
the same training budget; ``--full`` adds the HiDe-style row (IT-Prompt without the text guide). Columns: FAA, CAA,
FFM, CODA's forgetting (:mod:`vlprompt.eval.cil`), task-identity accuracy after the last task (routing methods),
trainable parameters per task and wall time; one accuracy-matrix heatmap per row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlprompt.config import load_config
from vlprompt.demo.sections import CONFIGS, Row, register_section
from vlprompt.reports.pages import heatmap
from vlprompt.runners.cil import run_class_incremental

SECTION = "class-incremental classification (world, 96 classes, 10 tasks)"
#: (recipe, row label, extra overrides)
ROWS = [
    ("cil_zeroshot", "zero-shot CLIP", []),
    ("cil_l2p", "L2P", []),
    ("cil_dualprompt", "DualPrompt", []),
    ("cil_coda", "CODA-Prompt", []),
    ("cil_itprompt", "IT-Prompt", []),
    ("cil_itprompt", "IT-Prompt, C-NCM", ["method.classifier=ncm"]),
]
FULL_ROWS = [("cil_hide", "HiDe-style (no text guide)", [])]
#: Row column -> summary key of continual.json.
COLUMNS = {
    "FAA": "cil/acc/faa",
    "CAA": "cil/acc/caa",
    "FFM": "cil/acc/ffm",
    "forgetting (CODA)": "cil/acc/forgetting_coda",
    "task id": "cl/task_acc/last",
}


@register_section("cil")
def cil_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """One row per method; time = the run's own wall time (training and evaluation of every task)."""
    rows = []
    for recipe, label, extra in ROWS + (FULL_ROWS if full else []):
        ctx["console"].print(f"[bold]cil[/bold]: {label} ...")
        run_name = recipe + ("_" + "_".join(e.split("=")[-1] for e in extra) if extra else "")
        overrides = [f"data.root={world}", f"out_dir={ctx['out']}", f"run_name={run_name}", "resume=true", *extra]
        cfg = load_config(CONFIGS / f"{recipe}.yaml", overrides + ctx["overrides"])
        results = run_class_incremental(cfg, progress=ctx["progress"])
        summary = results["summary"]
        metrics = {col: summary[key] for col, key in COLUMNS.items() if summary.get(key) is not None}
        names = [t["name"] for t in results["tasks"]]
        matrix = [[math.nan if v is None else v for v in row] for row in results["matrices"]["acc"]]
        figure = heatmap(matrix, [f"after {n}" for n in names], names, f"{label}: accuracy (task x after session)")
        info = {"figures": [(f"cil: {label}, accuracy matrix", figure)], "summary": summary}
        rows.append(Row(SECTION, label, "world", metrics, results["params"]["trainable_per_task"],
                        round(results["seconds"], 1), info))  # fmt: skip
    return rows
