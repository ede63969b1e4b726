"""Demo section ``grounding``: continual referring-expression grounding on the embedded world.

Every row starts from the world's pretrained detector (``grounding.detector=world``: the shipped OWL-ViT-style heads
on the shipped tiny CLIP, :mod:`vlprompt.runners.world_detector`) and runs the world's continual grounding sequence
(one task per super-category, each in its own setting; train on task ``t`` only, evaluate every seen task's test
expressions with the task unknown). Rows: the zero-shot detector, S-Prompts, L2P, MaPLe-style prompts, DCP and LPI,
each from ``configs/world/grounding_*.yaml`` with the same budget (one epoch per task, AdamW 0.01, batch 16);
``--full`` adds LPI with the true task at test time (routing taken out).

The default run is the first :data:`DEFAULT_TASKS` tasks (cheap on a CPU); ``--full`` runs all six. Columns: final
average P@1 over the seen tasks after the last one, max-minus-last forgetting of P@1, routing accuracy after the last
task, trainable parameters per task and wall time; one heatmap of the P@1 matrix per row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlprompt.config import load_config
from vlprompt.demo.sections import CONFIGS, Row, register_section
from vlprompt.reports.pages import heatmap
from vlprompt.runners.grounding import run_continual_grounding

SECTION = "continual grounding (world)"
NOTE = ("P@1: final average Precision@1 (the top box overlaps the target with GIoU >= 0.5) over the seen tasks after "
        "training on the last one; F@1: max-minus-last forgetting of P@1 (positive = forgotten); route: share of test "
        "images routed to their own task's prompts (methods with per-task prompts); trainable: parameters trained per "
        "task. Every row starts from the world's pretrained detector (grounding.detector=world).")  # fmt: skip
#: Tasks the default (non-full) section runs; ``--full`` runs the whole sequence.
DEFAULT_TASKS = 3
#: (recipe, row label, extra overrides)
ROWS = [
    ("grounding_zeroshot", "zero-shot detector", []),
    ("grounding_sprompts", "S-Prompts", []),
    ("grounding_l2p", "L2P", []),
    ("grounding_maple", "MaPLe", []),
    ("grounding_dcp", "DCP", []),
    ("grounding_lpi", "LPI", []),
]
FULL_ROWS = [("grounding_lpi", "LPI (oracle task)", ["continual.oracle_task=true"])]
#: Row column -> summary key of continual.json.
COLUMNS = {
    "P@1": "cl/rec/P@1/last",
    "F@1": "cl/rec/P@1/forgetting",
    "P@5": "cl/rec/P@5/last",
    "route": "cl/route/acc/last",
}
ORACLE_COLUMN = ("P@1 (true task)", "cl/oracle/P@1/last")


@register_section("grounding", notes={SECTION: NOTE})
def grounding_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """One row per method; the time column is the run's own wall time (training + evaluation of every task)."""
    rows = []
    tasks = [] if full else [f"continual.max_tasks={DEFAULT_TASKS}"]
    for recipe, label, extra in ROWS + (FULL_ROWS if full else []):
        ctx["console"].print(f"[bold]grounding[/bold]: {label} ...")
        run_name = recipe + ("_oracle" if extra else "") + ("" if full else f"_{DEFAULT_TASKS}tasks")
        overrides = [f"data.root={world}", f"out_dir={ctx['out']}", f"run_name={run_name}", "resume=true", *tasks,
                     *extra]  # fmt: skip
        cfg = load_config(CONFIGS / f"{recipe}.yaml", overrides + ctx["overrides"])
        results = run_continual_grounding(cfg, progress=ctx["progress"])
        summary = results["summary"]
        columns = COLUMNS | (dict([ORACLE_COLUMN]) if extra else {})
        metrics = {col: summary[key] for col, key in columns.items() if summary.get(key) is not None}
        names = [t["name"] for t in results["tasks"]]
        matrix = [[math.nan if v is None else v for v in row] for row in results["matrices"]["rec/P@1"]]
        figure = heatmap(
            matrix, [f"after {n}" for n in names], names, f"{label}: P@1 (row: after training, column: task)"
        )
        info = {"figures": [(f"grounding: {label}, P@1 matrix", figure)], "summary": summary, "tasks": len(names)}
        rows.append(Row(SECTION, label, "world", metrics, results["params"]["trainable_per_task"],
                        round(results["seconds"], 1), info))  # fmt: skip
    return rows
