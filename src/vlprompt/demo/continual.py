"""Demo section ``continual``: continual image-text retrieval on the embedded world's task sequence.

Six tasks, one per super-category (polygons, curved shapes, marks, letters, digits, symbols); each method trains on
task ``t`` only and is evaluated on the union of the test sets of tasks ``0..t``. Rows: zero-shot (frozen tiny CLIP),
sequential fine-tuning of one prompt pair, S-Prompts (a prompt pair per task + K-means routing), L2P (a shared
key-query prompt pool) and LPI (per-task low-rank prompts + routing), each from ``configs/world/continual_*.yaml``.
``--full`` adds LPI with the oracle task at test time (routing taken out). Columns: final average R@1 both ways,
forgetting (max-minus-last, positive = forgetting) both ways, routing accuracy after the last task, trainable
parameters per task, wall time; one heatmap of the i2t R@1 matrix per row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlprompt.config import load_config
from vlprompt.demo.sections import CONFIGS, Row, register_section
from vlprompt.reports.pages import heatmap
from vlprompt.runners.continual import run_continual

SECTION = "continual retrieval (world, 6 tasks)"
NOTE = ("i2t/R@1, t2i/R@1: final average R@1 over all six tasks after training on the last one; forget: "
        "max-minus-last forgetting of R@1 (positive = forgotten); route: share of test images / captions routed to "
        "their own task's prompts; trainable: parameters trained per task.")  # fmt: skip
#: (recipe, row label, extra overrides)
ROWS = [
    ("continual_zeroshot", "zero-shot", []),
    ("continual_seqft", "sequential FT", []),
    ("continual_sprompts", "S-Prompts", []),
    ("continual_l2p", "L2P", []),
    ("continual_lpi", "LPI", []),
]
FULL_ROWS = [("continual_lpi", "LPI (oracle task)", ["continual.oracle_task=true"])]
#: Row column -> summary key of continual.json (R@1: final average; forget: max-minus-last; route: routing accuracy).
COLUMNS = {
    "i2t/R@1": "cl/i2t/R@1/last",
    "t2i/R@1": "cl/t2i/R@1/last",
    "i2t forget": "cl/i2t/R@1/forgetting",
    "t2i forget": "cl/t2i/R@1/forgetting",
    "route img": "cl/route/image_acc/last",
    "route txt": "cl/route/text_acc/last",
}


@register_section("continual", notes={SECTION: NOTE})
def continual_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """One row per method; the time column is the run's own wall time (training + evaluation of every task)."""
    rows = []
    for recipe, label, extra in ROWS + (FULL_ROWS if full else []):
        ctx["console"].print(f"[bold]continual[/bold]: {label} ...")
        run_name = recipe + ("_oracle" if extra else "")
        overrides = [f"data.root={world}", f"out_dir={ctx['out']}", f"run_name={run_name}", "resume=true", *extra]
        cfg = load_config(CONFIGS / f"{recipe}.yaml", overrides + ctx["overrides"])
        results = run_continual(cfg, progress=ctx["progress"])
        summary = results["summary"]
        metrics = {col: summary[key] for col, key in COLUMNS.items() if summary.get(key) is not None}
        names = [t["name"] for t in results["tasks"]]
        matrix = [[math.nan if v is None else v for v in row] for row in results["matrices"]["i2t/R@1"]]
        figure = heatmap(
            matrix, [f"after {n}" for n in names], names, f"{label}: i2t R@1 (row: after training, column: task)"
        )
        extra_info = {"figures": [(f"continual: {label}, i2t R@1 matrix", figure)], "summary": summary}
        rows.append(Row(SECTION, label, "world", metrics, results["params"]["trainable_per_task"],
                        round(results["seconds"], 1), extra_info))  # fmt: skip
    return rows
