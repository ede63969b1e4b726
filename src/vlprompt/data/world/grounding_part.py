"""The grounding part of the world: referring-expression scenes written as MDETR ``finetune_refcoco`` files.

* ``base_train``/``base_val``: plain background, objects of every super-category, no held-out category-colour
  pair (the part a detector is pretrained on, like the CLIPs on the retrieval base part);
* ``train``/``val``/``test``: the continual sequence, per super-category (all objects of a scene from it) in the
  same settings as the continual retrieval scenes; ``test`` also in every shifted domain (same scenes and
  expressions, other pixels).

Each image entry is one expression (MDETR's unit) with exactly one annotation: the target's tight box from the
renderer (:func:`~vlprompt.data.world.render.object_box`), its category (ids 1-24, whose COCO ``supercategory`` is
the world's super-category name, the names of ``continual/tasks.json``), ``original_id`` (scene id / object id,
as MDETR keeps COCO's image and annotation ids) and ``tokens_positive`` (the target's noun phrase).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlprompt.data.world import layout as L
from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.refexp import choose_expression, expression_text, landmarks, sample_grounding_scene
from vlprompt.data.world.render import object_box
from vlprompt.data.world.scenes import CANVAS, SceneSpec, all_colours, base_colours
from vlprompt.data.world.settings import scene_setting

RngFor = Callable[..., random.Random]  # item keys -> that item's own seeded generator
AddImage = Callable[[str, SceneSpec, str], str]  # (relpath, scene, domain) -> relpath, queued for rendering


@dataclass(frozen=True)
class GroundingSize:
    """Scene counts: the base part's in total, the continual sequence's per task."""

    base_train: int
    base_val: int
    train: int
    val: int
    test: int


def categories() -> list[dict[str, Any]]:
    """COCO-style ``categories``: ids 1-24 in vocabulary order, super-category = the world's super-category name."""
    return [{"supercategory": V.SUPERCATEGORIES[c.supercategory - 1], "id": i, "name": c.name}
            for i, c in enumerate(V.CATEGORIES, start=1)]  # fmt: skip


def _document(entries: list[dict[str, Any]], dataset: str, domain: str) -> dict[str, Any]:
    images, annotations = [], []
    for k, e in enumerate(entries):
        text, (start, end) = e["text"], e["span"]
        images.append({
            "file_name": L.image_relpath(domain, e["name"]), "height": CANVAS, "width": CANVAS, "id": k,
            "original_id": e["scene_id"], "caption": text, "dataset_name": dataset,
            "tokens_negative": [[0, len(text)]],
        })  # fmt: skip
        x, y, w, h = e["bbox"]
        annotations.append({
            "area": round(w * h, 4), "iscrowd": 0, "image_id": k, "category_id": e["category_id"], "id": k,
            "bbox": [x, y, w, h], "original_id": e["ann_id"], "tokens_positive": [[start, end]],
        })  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": categories()}


def _expressions(scene: SceneSpec, rng: random.Random, name: str, scene_id: int) -> list[dict[str, Any]]:
    out = []
    marks = landmarks(scene.objects)
    for i, obj in enumerate(scene.objects):
        expr = choose_expression(scene.objects, i, rng, marks)
        if expr is None:  # two look-alikes with no clear place between them: not referable, like RefCOCO skips
            continue
        text, span = expression_text(expr, rng)
        out.append({"name": name, "scene_id": scene_id, "ann_id": 10 * scene_id + i, "text": text, "span": span,
                    "bbox": [round(v, 4) for v in object_box(obj)],
                    "category_id": V.CATEGORY_INDEX[obj.category] + 1})  # fmt: skip
    return out


def plan_grounding(rng_for: RngFor, add_image: AddImage, size: GroundingSize) -> tuple[dict[str, Any], dict]:
    """Sample every grounding scene and expression, queue the images; returns ``({relpath: JSON doc}, counts)``."""
    docs: dict[str, Any] = {}
    scene_id = 0
    counts: dict[str, Any] = {}

    def scenes(part: str, split: str, n: int, task: int | None) -> list[tuple[str, SceneSpec, list[dict]]]:
        nonlocal scene_id
        out = []
        for i in range(n):
            if task is None:
                name, rng = f"grb_{split}_{i:05d}", rng_for("grounding", part, split, i)
                scene = sample_grounding_scene(rng, [c.name for c in V.CATEGORIES], base_colours)
            else:
                name, rng = f"gr_{split}_{task}_{i:04d}", rng_for("grounding", part, split, task, i)
                cats = [c.name for c in V.CATEGORIES if c.supercategory == task]
                scene = sample_grounding_scene(rng, cats, all_colours, scene_setting(rng, task))
            found = _expressions(scene, rng, name, scene_id)
            scene_id += 1
            if found:
                out.append((name, scene, found))
        return out

    def write(key: str, items: list, domain: str = "clean") -> None:
        path = L.grounding_file(".", key if key.startswith("base_") else key.split("_")[0], domain)
        for name, scene, _ in items:
            add_image(L.image_relpath(domain, name), scene, domain)
        dataset = path.name.removeprefix("finetune_").rsplit("_", 1)[0]
        docs[path.as_posix().removeprefix("./")] = _document([e for *_, f in items for e in f], dataset, domain)
        counts[key] = {"images": len(items), "expressions": sum(len(f) for *_, f in items)}

    for split, n in (("train", size.base_train), ("val", size.base_val)):
        write(f"base_{split}", scenes("base", split, n, None))
    tasks = range(1, len(V.SUPERCATEGORIES) + 1)
    for split, n in (("train", size.train), ("val", size.val), ("test", size.test)):
        items = [s for t in tasks for s in scenes("cl", split, n, t)]
        write(split, items)
        if split == "test":
            for d in L.SHIFTED_DOMAINS:
                write(f"test_{d}", items, d)
    return docs, counts
