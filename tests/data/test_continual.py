"""Task sequences (world, COCO, from a train file), caption cleaning and the COCO continual split builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlprompt.data.continual import (
    COCO_TASK_POSITIVES,
    LPI_COCO_ORDER,
    build_coco_continual,
    build_coco_split,
    category_to_task,
    coco_task_sequence,
    make_sequence,
    pre_caption,
    read_task_similarity,
    read_tasks_file,
    resolve_task_sequence,
    task_filter,
    task_relation,
)
from vlprompt.data.karpathy import ImageTextPairs, load_gallery, read_annotations
from vlprompt.data.world import layout
from vlprompt.errors import DataError


def test_lpi_task_order():
    tasks = coco_task_sequence()
    assert {t.index: t.categories[0] for t in tasks} == dict(enumerate([11, 6, 3, 10, 5, 12, 7, 9, 2, 8, 4, 1]))
    assert [t.name for t in tasks][:3] == ["appliance", "sports", "outdoor"] and tasks[-1].name == "person"
    assert LPI_COCO_ORDER[0] == 11


def test_world_sequence_and_filters(small_world: Path):
    tasks = read_tasks_file(layout.continual_tasks_file(small_world))
    assert [t.name for t in tasks][:2] == ["polygons", "curved shapes"] and len(tasks) == 6
    train = layout.continual_file(small_world, "train")
    pairs = ImageTextPairs(train, small_world, None, filter=task_filter(tasks[1]))
    assert len(pairs) > 0 and all("cl_train_2_" in p.name for p in pairs.image_paths)
    gallery = load_gallery(layout.continual_file(small_world, "val"), small_world, filter=task_filter(tasks[:2]))
    assert {r["category"] for r in gallery.records} == {1, 2}
    assert category_to_task(tasks)[6] == 5


def test_resolve_from_train_file_and_order(small_world: Path):
    train = layout.continual_file(small_world, "train")
    assert [t.categories for t in resolve_task_sequence("", [], small_world, train)] == [(c,) for c in range(1, 7)]
    seq = resolve_task_sequence("continual/tasks.json", [3, 1], small_world, None)
    assert [(t.index, t.name) for t in seq] == [(0, "marks"), (1, "polygons")]
    with pytest.raises(DataError, match="categories \\[9\\]"):
        resolve_task_sequence("continual/tasks.json", [9], small_world, None)
    assert len(resolve_task_sequence("coco", [], "", None)) == 12


def test_sequence_errors(tmp_path: Path):
    with pytest.raises(DataError, match="more than one task"):
        make_sequence([1, [2, 1]])
    assert make_sequence([[1, 2], 3], {1: "a", 2: "b"})[0].name == "a+b"
    bad = tmp_path / "tasks.json"
    bad.write_text('{"names": {}}')
    with pytest.raises(DataError, match="'order' list"):
        read_tasks_file(bad)
    with pytest.raises(DataError, match="not found"):
        read_tasks_file(tmp_path / "missing.json")


def test_task_relation_and_similarity_file(tmp_path: Path):
    rel = task_relation(coco_task_sequence(), COCO_TASK_POSITIVES)
    names = [t.name for t in coco_task_sequence()]
    i = names.index
    assert rel[i("appliance"), i("kitchen")] == 1 and rel[i("kitchen"), i("appliance")] == 1
    assert rel[i("electronic")].sum() == 1  # related to itself only
    assert (rel == rel.T).all() and (np.diag(rel) == 1).all()
    path = tmp_path / "sim.txt"
    path.write_text("1 0.5 0.1\n0.5 1 0.41\n0.1 0.41 1\n")
    assert read_task_similarity(path, 2).tolist() == [[1, 1], [1, 1]]
    assert read_task_similarity(path, 3, threshold=0.45)[1, 2] == 0


def test_pre_caption():
    assert pre_caption("A man's  dog, (running)-fast/slow!") == "a mans dog running fast slow"
    assert pre_caption(" ".join(["w"] * 40)).count("w") == 30


def _coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    cats = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    ]
    for split in ("train", "val"):
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in (1, 2, 3)]
        captions = [{"image_id": i, "id": 10 * i + k, "caption": f"Photo {i}, number {k}."} for i in (1, 2, 3)
                    for k in range(2)]  # fmt: skip
        # image 1: first instance is a dog (animal) although a person follows; image 3 has no instance
        anns = [{"image_id": 1, "category_id": 18, "id": 5}, {"image_id": 1, "category_id": 1, "id": 6},
                {"image_id": 2, "category_id": 44, "id": 7}]  # fmt: skip
        (root / "annotations" / f"captions_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": captions})
        )
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))  # fmt: skip
    return root


def test_build_coco_split(tmp_path: Path):
    root = _coco(tmp_path)
    a = root / "annotations"
    recs, stats = build_coco_split(a / "captions_val2014.json", a / "instances_val2014.json", "val2014", grouped=True)
    assert [(r["image"], r["category"]) for r in recs] == [("val2014/COCO_val2014_000000000001.jpg", 4),
                                                            ("val2014/COCO_val2014_000000000002.jpg", 7)]  # fmt: skip
    assert recs[0]["caption"] == ["photo 1 number 0", "photo 1 number 1"]
    assert stats["dropped_without_instances"] == 1 and stats["images_per_category"] == {"animal": 1, "kitchen": 1}
    pairs, stats = build_coco_split(a / "captions_train2014.json", a / "instances_train2014.json", "train2014", False)
    assert len(pairs) == 4 and pairs[0]["image_id"] == "1" and stats["images"] == 2


def test_build_coco_continual_writes_albef_files(tmp_path: Path):
    summary = build_coco_continual(_coco(tmp_path), tmp_path / "out")
    assert set(summary) == {"retrieval_train2014.json", "retrieval_val2014.json"}
    train = read_annotations(tmp_path / "out" / "retrieval_train2014.json")
    assert all(isinstance(r["caption"], str) and r["category"] in (4, 7) for r in train)
    seq = read_tasks_file(tmp_path / "out" / "tasks.json")
    assert [t.name for t in seq] == [t.name for t in coco_task_sequence()]


def test_bad_coco_file(tmp_path: Path):
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(DataError, match="not a COCO annotation file"):
        build_coco_split(tmp_path / "c.json", tmp_path / "c.json", "x", grouped=True)
