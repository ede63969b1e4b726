"""A tiny referring-expression set in MDETR's format with generated images (used by the data and runner tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

#: Two super-categories = two tasks; the task file names them as the MDETR categories' ``supercategory`` does.
CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animal"},
    {"id": 2, "name": "car", "supercategory": "vehicle"},
]
TASKS = {"order": [1, 2], "names": {"1": "animal", "2": "vehicle"}}
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_rec_set(root: Path, per_task: dict[str, int] | None = None, size: tuple[int, int] = (96, 64)) -> Path:
    """``root/images/*.png``, ``root/ann/finetune_toy_{train,test}.json`` and ``root/tasks.json``; returns root.

    Each image shows two coloured blocks on grey; each expression names one block's colour, its target that block.
    Images are ``size = (width, height)`` (not square: the detector input squashes them)."""
    per_task = per_task or {"train": 4, "test": 3}
    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(exist_ok=True)
    (root / "tasks.json").write_text(json.dumps(TASKS))
    w, h = size
    for split, n in per_task.items():
        images, annotations = [], []
        for cat in CATEGORIES:
            for i in range(n):
                name = f"{split}_{cat['id']}_{i}.png"
                picture = Image.new("RGB", size, (128, 128, 128))
                colours = rng.sample(sorted(COLOURS), 2)
                boxes = [(4, 6, w // 2 - 8, h - 16), (w // 2 + 4, 10, w // 2 - 10, h - 22)]
                for colour, (x, y, bw, bh) in zip(colours, boxes, strict=True):
                    picture.paste(COLOURS[colour], (x, y, x + bw, y + bh))
                picture.save(root / "images" / name)
                k = len(images)
                target = i % 2
                images.append({"id": 1000 * cat["id"] + k, "file_name": name, "width": w, "height": h,
                               "caption": f"the {colours[target]} block", "original_id": k,
                               "dataset_name": "toy"})  # fmt: skip
                annotations.append({"id": k, "image_id": 1000 * cat["id"] + k, "bbox": list(boxes[target]),
                                    "category_id": cat["id"], "original_id": k})  # fmt: skip
        doc = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "ann" / f"finetune_toy_{split}.json").write_text(json.dumps(doc))
    return root


def rec_overrides(root: Path, out: Path, name: str) -> list[str]:
    """``key=value`` overrides that point a config at :func:`write_rec_set`'s files."""
    return [f"data.root={root}", "data.format=mdetr-refexp", "data.train=ann/finetune_toy_train.json",
            "data.test=ann/finetune_toy_test.json", "grounding.images=images", "grounding.dataset=toy",
            "continual.tasks=tasks.json", "continual.eval_split=test", f"out_dir={out}", f"run_name={name}",
            "backbone.name=vlprompt-tiny", "backbone.pretrained=null", "grounding.detector=",
            "device=cpu"]  # fmt: skip
