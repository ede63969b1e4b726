"""Demo section ``rvlr``: modality-balanced retrieval on the embedded world.

Full fine-tuning of the tiny CLIP with the contrastive loss only (``configs/world/rvlr_contrastive.yaml``) vs the
same fine-tuning plus RVLR's distillation (``rvlr_distill.yaml``) from two frozen teachers: the image tower and the
text tower of the embedded ``vlprompt-small``, cached once with :mod:`vlprompt.data.features`. Every row reports
cross-modal R@1 (both directions), single-modal NDCG@10 (image->image, text->text) and mixed NDCG@10
(image->images+texts, text->texts+images) on the clean test gallery, with ROUGE-L relevance computed once. The
frozen tiny CLIP (zero-shot) and the frozen teacher are reference rows. ``--full`` adds two ablations
(representation distillation only, structure distillation only).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vlprompt.backbone import load_backbone
from vlprompt.config import load_config
from vlprompt.data.features import extract_split_features
from vlprompt.demo.sections import CONFIGS, Row, register_section, run_recipe
from vlprompt.reports.runs import chance_levels
from vlprompt.runners.eval_run import evaluate_target

SECTION = "modality-balanced retrieval (RVLR)"
METRICS = ("t2i/R@1", "i2t/R@1", "i2i/NDCG@10", "t2t/NDCG@10", "i2it/NDCG@10", "t2it/NDCG@10")
TEACHER = ("vlprompt-small", "world")


def teacher_caches(world: Path, out: Path) -> tuple[Path, Path]:
    """The teachers' features of the training pairs (computed once; a finished cache is reused)."""
    cfg = load_config(CONFIGS / "rvlr_distill.yaml", [f"data.root={world}"])
    backbone = load_backbone(*TEACHER)
    folders = []
    for modality in ("image", "text"):
        folder = out / "rvlr_teachers" / modality
        encoder = f"{TEACHER[0]}@{TEACHER[1]}/{modality}"
        extract_split_features(cfg.data, "train", modality, folder, backbone, encoder)
        folders.append(folder)
    return folders[0], folders[1]


def _row(method: str, metrics: dict[str, float], trainable: int, seconds: float, chance: dict[str, float]) -> Row:
    extra = {"chance": {k: v for k, v in chance.items() if k in METRICS}}
    return Row(SECTION, method, "clean", {k: metrics[k] for k in METRICS}, trainable, round(seconds, 1), extra)


@register_section("rvlr")
def rvlr_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """Zero-shot, teacher, contrastive-only and RVLR fine-tuning (plus ablations with ``full``)."""
    out, console = ctx["out"], ctx["console"]
    start = time.perf_counter()
    console.print(f"[bold]{SECTION}[/bold]: teacher features ...")
    image, text = teacher_caches(world, out)
    teacher_seconds = time.perf_counter() - start
    relevance = out / "rvlr_relevance_test_clean.npy"
    frozen = [f"data.root={world}", *ctx["overrides"]]
    overrides = [*frozen, f"method.image_teacher={image}", f"method.text_teacher={text}"]

    rows = []
    chance = chance_levels(load_config(CONFIGS / "rvlr_zeroshot.yaml", frozen))  # R@K; NDCG has no simple chance
    for label, model in (("zero-shot", "vlprompt-tiny"), ("teacher (small, frozen)", TEACHER[0])):
        console.print(f"[bold]{SECTION}[/bold]: {label} ...")
        t0 = time.perf_counter()
        config = CONFIGS / "rvlr_zeroshot.yaml"
        metrics = evaluate_target(config, [*frozen, f"backbone.name={model}"], "test", "all", relevance)
        rows.append(_row(label, metrics, 0, time.perf_counter() - t0, chance))

    runs = [("contrastive FT", "rvlr_contrastive", []), ("RVLR FT", "rvlr_distill", [])]
    if full:
        runs += [
            ("RVLR FT, rep. KD only", "rvlr_distill", ["method.w_kd=0"]),
            ("RVLR FT, struct. KD only", "rvlr_distill", ["method.w_rep_image=0", "method.w_rep_text=0"]),
        ]
    for i, (label, recipe, extra) in enumerate(runs):
        console.print(f"[bold]{SECTION}[/bold]: {label} ...")
        run_name = f"{recipe}_{i}"
        result, seconds = run_recipe(recipe, out, run_name, ctx["progress"], overrides + extra)
        metrics = evaluate_target(out / run_name, [], "test", "all", relevance)
        row = _row(label, metrics, result["params"]["trainable"], seconds, chance)
        row.extra["teacher_seconds"] = round(teacher_seconds, 1)
        rows.append(row)
    return rows  # the demo report plots every column (R@1 per direction, NDCG@10 per protocol)
