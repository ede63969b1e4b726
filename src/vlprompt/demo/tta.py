"""Demo section ``tta``: episodic test-time adaptation on the embedded world's shifted domains.

The policy is the tiny CLIP (``vlprompt-tiny``), the reward model of RLCF the larger ``vlprompt-small``. For each
shifted domain it runs the ``configs/world/tta_*.yaml`` recipes on the same seeded test samples:

- classification (96 colour x shape classes, the world's ``classes.json``): zero-shot, TPT (prompt tuning by
  entropy), RLCF with prompt tuning, RLCF tuning the image tower: top-1 / top-5 accuracy;
- retrieval (the domain's test gallery), image->text and text->image: zero-shot and RLCF, R@1 and R@5.

Every row reports milliseconds per test sample (views, adaptation and prediction). The default run covers the
sketch domain; ``--full`` every shifted domain.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vlprompt.config import load_config
from vlprompt.data.world import layout
from vlprompt.demo.sections import CONFIGS, Row, register_section
from vlprompt.reports.runs import chance_levels
from vlprompt.runners.tta import run_tta

CLASSIFICATION = "test-time adaptation: classification"
RETRIEVAL = "test-time adaptation: retrieval"
NOTE = ("Each test sample is adapted on by itself, predicted, then the model is reset. ms/sample: milliseconds "
        "per test sample for building its views, adapting and predicting; the one-off encoding of the gallery and "
        "the reward model's features is not included (seconds_setup in the run's metrics.json).")  # fmt: skip
CLASSIFICATION_RECIPES = {"zero-shot": "tta_zeroshot", "TPT": "tta_tpt", "RLCF (prompt)": "tta_rlcf_prompt",
                          "RLCF (encoder)": "tta_rlcf_encoder"}  # fmt: skip


def _run(recipe: str, overrides: list[str], ctx: dict[str, Any], name: str) -> tuple[dict[str, Any], float]:
    cfg = load_config(CONFIGS / f"{recipe}.yaml", [f"out_dir={ctx['out']}", f"run_name={name}", *overrides])
    ctx["console"].print(f"[bold]tta[/bold]: {name} ...")
    start = time.perf_counter()
    return run_tta(cfg, progress=ctx["progress"]), time.perf_counter() - start


def _ms(metrics: dict[str, Any]) -> float:
    """Milliseconds per sample of the episodic loop (views, adaptation, prediction; not the one-off setup)."""
    return 1000.0 * metrics["seconds_adapt_per_sample"]


def _chance(recipe: str, overrides: list[str], classification: bool) -> dict[str, float]:
    """Chance levels of the recipe's test data, under the demo's column names (acc@k for top-k)."""
    levels = chance_levels(load_config(CONFIGS / f"{recipe}.yaml", overrides), classification)
    return {k.replace("cls/top", "acc@"): v for k, v in levels.items()}


@register_section("tta", notes={CLASSIFICATION: NOTE, RETRIEVAL: NOTE})
def tta_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """Zero-shot vs TPT vs RLCF (prompt, encoder) classification and zero-shot vs RLCF retrieval per domain."""
    rows = []
    for domain in layout.SHIFTED_DOMAINS if full else ("sketch",):
        data = [f"data.root={world}", f"data.test=classification/{domain}/test", *ctx["overrides"]]
        chance = _chance("tta_zeroshot", data, classification=True)
        for label, recipe in CLASSIFICATION_RECIPES.items():
            m, seconds = _run(recipe, data, ctx, f"{recipe}_{domain}")
            metrics = {"acc@1": m["cls/top1"], "acc@5": m["cls/top5"], "ms/sample": _ms(m)}
            rows.append(Row(CLASSIFICATION, label, domain, metrics, m["trainable"], round(seconds, 1),
                            {"samples": m["samples"], "chance": chance}))  # fmt: skip
        data = [f"data.root={world}", f"data.test=retrieval/test_{domain}.json", *ctx["overrides"]]
        chance = _chance("tta_zeroshot_retrieval", data, classification=False)
        for direction in ("i2t", "t2i"):
            keys = (f"{direction}/R@1", f"{direction}/R@5")
            for label, recipe in (("zero-shot", "tta_zeroshot_retrieval"), ("RLCF", f"tta_rlcf_{direction}")):
                overrides = [*data, f"method.direction={direction}"]
                name = f"tta_{label.lower().replace('-', '')}_{direction}_{domain}"
                m, seconds = _run(recipe, overrides, ctx, name)
                metrics = {k: m[k] for k in keys} | {"ms/sample": _ms(m)}
                rows.append(Row(f"{RETRIEVAL} ({direction})", label, domain, metrics, m["trainable"],
                                round(seconds, 1), {"samples": m["samples"], "chance": chance}))  # fmt: skip
    return rows
