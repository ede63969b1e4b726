"""What every demo section shares: the :class:`Row` of the demo table, the section registry and the recipe runner.

A section is a function ``rows(world, full, ctx) -> list[Row]`` registered by name with :func:`register_section`,
as methods are; ``vlprompt.demo`` imports every section module (which registers it) and
:func:`vlprompt.demo.run.run_demo` runs the chosen ones in registration order. Sections import this module only,
never each other or the demo runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.config import load_config
from vlprompt.core.trainer import train
from vlprompt.reports.runs import chance_levels
from vlprompt.runners.eval_run import evaluate_target

#: The demo's recipes, ``configs/world/*.yaml`` of the source tree.
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "world"
#: The sections ``make demo`` runs; ``--full`` runs every registered one. The video rows join once measured within
#: the demo's time bound.
DEFAULT_SECTIONS = ("retrieval",)


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


#: ``(world, full, ctx) -> rows``; ``ctx`` holds ``out``, ``progress``, ``overrides`` (for every recipe), ``console``.
SectionRows = Callable[[Path, bool, dict[str, Any]], list[Row]]


#: Demo sections by name, in registration order (the order of the table and the report); see :func:`register_section`.
SECTIONS: dict[str, SectionRows] = {}
#: What a section's columns mean where the glossary's generic words are not enough, by section title prefix.
NOTES: dict[str, str] = {}


def register_section(name: str, notes: dict[str, str] | None = None) -> Callable[[SectionRows], SectionRows]:
    """Decorator: register a section's rows function under ``name`` (its ``--sections`` name) with the notes its
    rows' section titles need; a name may be taken once."""

    def deco(rows: SectionRows) -> SectionRows:
        if name in SECTIONS:
            raise KeyError(f"demo section {name!r} is already registered")
        SECTIONS[name] = rows
        NOTES.update(notes or {})
        return rows

    return deco


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
    """Run ``recipes`` with the data overrides ``data`` and collect one row each (with the data's chance levels)."""
    rows = []
    chance = chance_levels(load_config(CONFIGS / f"{recipes[0]}.yaml", data + ctx["overrides"]))
    for recipe in recipes:
        method = recipe.split("_", 1)[1]
        ctx["console"].print(f"[bold]{section}[/bold]: {method} ({label}) ...")
        result, seconds = run_recipe(recipe, ctx["out"], f"{recipe}_{label}", ctx["progress"], data + ctx["overrides"])
        test = result["test"]
        row = Row(section, method, label, {k: test[k] for k in metrics if k in test}, result["params"]["trainable"],
                  round(seconds, 1), {"chance": {k: v for k, v in chance.items() if k in metrics}})  # fmt: skip
        rows.append(row)
    return rows
