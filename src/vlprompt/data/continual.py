"""Continual task sequences: which categories form each task, in which order, and the COCO continual split.

A task sequence is read from a ``tasks.json`` file (``{"order": [category ids], "names": {id: name}}``, the
embedded world's format; an entry of ``order`` may also be a list of ids that form one task), taken from LPI's
COCO split (``"coco"``), or made from the categories present in the training file. Annotation files are
ALBEF-style JSON whose records carry an integer ``category`` (see :mod:`vlprompt.data.karpathy`).

The COCO builder is a **reconstruction**: LPI's annotation files were only distributed through a Baidu link, so
each image gets the super-category of its first instance annotation, which is the rule LPI's grounding code
applies (spec ``lpi.md`` section 1 and pitfall 15).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlprompt.data.karpathy import Record, RecordFilter, read_annotations
from vlprompt.errors import DataError

#: COCO's 12 super-categories with the integer ids LPI's files use (COCO's own super-category order).
COCO_SUPERCATEGORIES: dict[int, str] = {
    1: "person", 2: "vehicle", 3: "outdoor", 4: "animal", 5: "accessory", 6: "sports",
    7: "kitchen", 8: "food", 9: "furniture", 10: "electronic", 11: "appliance", 12: "indoor",
}  # fmt: skip
#: LPI's task order (``retrieval/utils/data.py``): task t trains on category ``LPI_COCO_ORDER[t]``.
LPI_COCO_ORDER: tuple[int, ...] = (11, 6, 3, 10, 5, 12, 7, 9, 2, 8, 4, 1)
#: Super-category pairs whose name embeddings have cosine > 0.4 in LPI's ``MID/task_sim_matrix.txt`` (the
#: positives of its task-contrast loss, spec section 3); the matrix itself is not shipped, only this relation.
COCO_TASK_POSITIVES: tuple[tuple[str, str], ...] = (
    ("appliance", "accessory"), ("appliance", "kitchen"), ("appliance", "furniture"), ("appliance", "vehicle"),
    ("sports", "food"), ("outdoor", "indoor"), ("outdoor", "kitchen"), ("kitchen", "indoor"),
    ("kitchen", "furniture"), ("kitchen", "food"), ("furniture", "food"), ("vehicle", "animal"),
    ("vehicle", "person"), ("food", "animal"), ("animal", "person"),
)  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """One task of a sequence: its position, a display name and the category ids it trains on."""

    index: int
    name: str
    categories: tuple[int, ...]


def make_sequence(order: Sequence[int | Sequence[int]], names: dict[int, str] | None = None) -> list[TaskSpec]:
    """Tasks from an order of category ids (an entry may be a list of ids forming one task)."""
    names = names or {}
    tasks, seen = [], set()
    for t, entry in enumerate(order):
        cats = (int(entry),) if isinstance(entry, int | np.integer) else tuple(int(c) for c in entry)
        if not cats:
            raise DataError(f"task {t} of the sequence has no category")
        clash = seen.intersection(cats)
        if clash:
            raise DataError(f"category {sorted(clash)[0]} appears in more than one task of the sequence")
        seen.update(cats)
        name = "+".join(names.get(c, str(c)) for c in cats)
        tasks.append(TaskSpec(t, name, cats))
    if not tasks:
        raise DataError("the task sequence is empty")
    return tasks


def coco_task_sequence() -> list[TaskSpec]:
    """LPI's 12 COCO tasks, in its order (appliance, sports, outdoor, ..., person)."""
    return make_sequence(LPI_COCO_ORDER, COCO_SUPERCATEGORIES)


def read_tasks_file(path: str | Path) -> list[TaskSpec]:
    """A ``tasks.json`` file (``{"order": [...], "names": {"1": "polygons", ...}}``) as a task sequence."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"task file not found: {path}") from err
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read task file {path}: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("order"), list):
        raise DataError(f"{path}: expected an object with an 'order' list of category ids")
    names = {int(k): str(v) for k, v in (raw.get("names") or {}).items()}
    return make_sequence(raw["order"], names)


def categories_in(records: Iterable[Record], key: str = "category") -> list[int]:
    """The distinct category ids of annotation records, ascending; a record without one is a DataError."""
    found = set()
    for i, rec in enumerate(records):
        value = rec.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"record {i} ({rec.get('image')}) has no integer {key!r} field")
        found.add(value)
    return sorted(found)


def resolve_task_sequence(
    tasks: str, order: Sequence[int], root: str | Path, train_file: str | Path | None, key: str = "category"
) -> list[TaskSpec]:
    """The sequence a config asks for: ``tasks`` is ``"coco"``, a tasks.json path (relative to ``root``) or ``""``
    (every category of the training file, ascending); a non-empty ``order`` re-orders or subsets the categories."""
    if tasks == "coco":
        seq = coco_task_sequence()
    elif tasks:
        path = Path(tasks).expanduser()
        seq = read_tasks_file(path if path.is_absolute() or not root else Path(root) / path)
    elif train_file is not None:
        seq = make_sequence(categories_in(read_annotations(train_file), key))
    else:
        raise DataError("no task sequence: set continual.tasks (a tasks.json file or 'coco') or data.train")
    if order:
        by_category = {c: t for t in seq for c in t.categories}
        missing = [c for c in order if c not in by_category]
        if missing:
            raise DataError(f"continual.order names categories {missing} that no task of the sequence holds")
        names = {c: by_category[c].name for c in order if len(by_category[c].categories) == 1}
        seq = make_sequence(list(order), names)
    return seq


def task_filter(task: TaskSpec | Sequence[TaskSpec], key: str = "category") -> RecordFilter:
    """A record filter keeping the records of one task (or of several)."""
    specs = [task] if isinstance(task, TaskSpec) else list(task)
    wanted = {c for t in specs for c in t.categories}
    return lambda rec: rec.get(key) in wanted


def category_to_task(tasks: Sequence[TaskSpec]) -> dict[int, int]:
    """Category id -> task index."""
    return {c: t.index for t in tasks for c in t.categories}


def task_relation(tasks: Sequence[TaskSpec], positives: Iterable[tuple[str, str]]) -> np.ndarray:
    """Binary ``[T, T]`` matrix in task order: 1 on the diagonal and for each named pair of related tasks."""
    index = {t.name: t.index for t in tasks}
    rel = np.eye(len(tasks), dtype=np.float32)
    for a, b in positives:
        if a in index and b in index:
            rel[index[a], index[b]] = rel[index[b], index[a]] = 1.0
    return rel


def read_task_similarity(path: str | Path, num_tasks: int, threshold: float = 0.4) -> np.ndarray:
    """Binary relation ``(M > threshold)`` from a whitespace-separated ``[T, T]`` similarity file in task order
    (LPI's ``MID/task_sim_matrix.txt`` format); the first ``num_tasks`` rows and columns are used."""
    try:
        m = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read task similarity matrix {path}: {err}") from err
    if m.shape[0] != m.shape[1] or m.shape[0] < num_tasks:
        raise DataError(f"{path}: need a square matrix with at least {num_tasks} rows, got shape {m.shape}")
    rel = (m[:num_tasks, :num_tasks] > threshold).astype(np.float32)
    np.fill_diagonal(rel, 1.0)
    return rel


# ---- LPI's caption cleaning and the COCO continual split ----------------------------------------------------
_STRIP = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF/LPI ``pre_caption``: lower-case, drop ``,.'!?"()*#:;~``, ``-``/``/`` to spaces, at most ``max_words``."""
    text = _STRIP.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = re.sub(r"\s{2,}", " ", text).strip().split(" ")
    return " ".join(words[:max_words])


def _load_coco(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise DataError(f"COCO annotation file not found: {path}") from err
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read COCO annotation file {path}: {err}") from err
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations')")
    return data


def coco_image_categories(instances: dict[str, Any]) -> dict[int, int]:
    """Image id -> LPI category id: the super-category of the image's first instance annotation (file order)."""
    ids = {name: i for i, name in COCO_SUPERCATEGORIES.items()}
    try:
        super_of = {c["id"]: ids[c["supercategory"]] for c in instances["categories"]}
    except KeyError as err:
        raise DataError(f"COCO instances file: unknown super-category or missing field {err}") from err
    first: dict[int, int] = {}
    for ann in instances["annotations"]:
        first.setdefault(ann["image_id"], super_of[ann["category_id"]])
    return first


def build_coco_split(
    captions_file: str | Path,
    instances_file: str | Path,
    image_dir: str,
    grouped: bool,
    clean: bool = True,
    max_words: int = 30,
) -> tuple[list[Record], dict[str, Any]]:
    """ALBEF-style records with a ``category`` field for one COCO 2014 split, and statistics.

    ``grouped`` writes one record per image with a caption list (val/test files), else one record per pair
    (train files, with ``image_id``). Images without any instance annotation have no super-category and are
    dropped (counted in the statistics). ``clean`` applies LPI's :func:`pre_caption`.
    """
    captions, instances = _load_coco(Path(captions_file)), _load_coco(Path(instances_file))
    category = coco_image_categories(instances)
    by_image: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        text = pre_caption(ann["caption"], max_words) if clean else ann["caption"].strip()
        by_image.setdefault(ann["image_id"], []).append(text)
    records: list[Record] = []
    dropped = 0
    for img in sorted(captions["images"], key=lambda im: im["id"]):
        caps = by_image.get(img["id"])
        if not caps:
            continue
        if img["id"] not in category:
            dropped += 1
            continue
        path, cat = f"{image_dir}/{img['file_name']}", category[img["id"]]
        if grouped:
            records.append({"image": path, "caption": caps, "category": cat})
        else:
            records += [{"image": path, "caption": c, "image_id": str(img["id"]), "category": cat} for c in caps]
    per_image = Counter({r["image"]: r["category"] for r in records}.values())
    stats = {
        "images": sum(per_image.values()),
        "records": len(records),
        "dropped_without_instances": dropped,
        "images_per_category": {COCO_SUPERCATEGORIES[c]: per_image[c] for c in sorted(per_image)},
    }
    return records, stats


def build_coco_continual(coco_root: str | Path, out_dir: str | Path, clean: bool = True) -> dict[str, Any]:
    """Write ``retrieval_train2014.json``, ``retrieval_val2014.json`` and ``tasks.json`` (LPI's order) to ``out_dir``.

    ``coco_root`` holds ``annotations/captions_{train,val}2014.json`` and ``annotations/instances_{train,val}2014``
    ``.json``; image paths in the output are relative to ``coco_root`` (``train2014/COCO_train2014_....jpg``).
    The official 2014 train/val split is used (LPI's exact split is unknown). Returns per-file statistics.
    """
    root, out = Path(coco_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for split, grouped in (("train", False), ("val", True)):
        records, stats = build_coco_split(
            root / "annotations" / f"captions_{split}2014.json",
            root / "annotations" / f"instances_{split}2014.json",
            f"{split}2014",
            grouped=grouped,
            clean=clean,
        )
        name = f"retrieval_{split}2014.json"
        (out / name).write_text(json.dumps(records) + "\n")
        summary[name] = stats
    tasks = {"order": list(LPI_COCO_ORDER), "names": {str(k): v for k, v in COCO_SUPERCATEGORIES.items()}}
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n")
    return summary
