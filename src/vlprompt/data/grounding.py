"""Referring-expression comprehension (REC) data: RefCOCO, RefCOCO+ and RefCOCOg in two layouts, and LPI's tasks.

* **MDETR** (``finetune_{refcoco,refcoco+,refcocog}_{train,val,testA,testB,test}.json``, written by MDETR's
  ``scripts/fine-tuning/refexp_coco_format.py``; GLIP and LPI's grounding code read them): COCO-style JSON with
  one ``images`` entry per expression (``id``, ``file_name``, ``width``, ``height``, ``caption`` = the
  expression, ``original_id`` = the COCO image id, ``dataset_name``), exactly one ``annotations`` entry per image
  entry (``image_id``, ``bbox`` = ``[x, y, w, h]`` pixels, ``category_id``, ``original_id`` = the COCO annotation
  id; MDETR's ``tokens_positive``/``tokens_negative`` spans are not read) and COCO's ``categories`` (with
  ``supercategory``). The split is in the file name.
* **refer toolkit** (lichengunc/refer: ``<dataset>/refs(unc|google|umd).p`` + ``<dataset>/instances.json``): a
  Python 2 pickle of a list of refs (``ref_id``, ``ann_id``, ``image_id``, ``category_id``, ``split``,
  ``sentences`` = ``[{"sent", "sent_id", ...}]``), read with vlprompt's restricted unpickler (plain values only),
  and a COCO instances file holding the referred images and annotations.

Both readers return :class:`RefSample` lists with **one sample per expression** (MDETR's unit, and what its and
LPI's evaluators count), in file order. MDETR's converter takes the expression from ``sent``, the category from
the ref and the box and image size from COCO, so a refer folder and the MDETR files made from it give the same
samples except for the identifiers: ``sample_id`` is the MDETR image id (what LPI's task lists hold) or refer's
``sent_id``, and only the refer layout knows the ``ref_id``. Image paths are the COCO ``train2014`` file names,
joined to ``image_root`` when one is given. Any malformed input is a :class:`~vlprompt.errors.DataError` naming the
file and the record.

**Tasks** (spec ``lpi.md`` sections 1 and 8): the task of a sample is the COCO super-category of its first (in
these files: its only) annotation's category, in LPI's order (appliance, sports, outdoor, electronic, accessory,
indoor, kitchen, furniture, vehicle, food, animal, person; :data:`vlprompt.data.continual.LPI_COCO_ORDER`). LPI's
per-task id lists (``TASK_DIV/<dataset>/<split>/GLIP_TASK_{t}_{train|val}``) were never released;
:func:`build_task_lists` regenerates them with the rules of LPI's ``ModulatedDataset``: ids ascending, and
expressions whose target box has a side of at most one pixel left out (GLIP's ``has_valid_annotation``, applied
before the split). Another task sequence (``tasks``, e.g. the embedded world's ``continual/tasks.json``, whose task
names are its super-categories) replaces LPI's COCO tasks in the readers and in :func:`build_task_lists`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.data.continual import TaskSpec, coco_task_sequence
from vlprompt.data.json_files import read_json
from vlprompt.errors import DataError
from vlprompt.safe_pickle import load_pickle

#: The refs pickle each dataset's folder holds by default (MDETR converts these three).
REFER_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
#: GLIP's ``has_valid_annotation``: a target with a side of at most this many pixels is left out of the tasks.
MIN_SIDE = 1.0
_MDETR_NAME = re.compile(r"^finetune_(?P<dataset>.+)_(?P<split>train|val|testA|testB|test)\.json$")
_TASK_LISTS_FORMAT = "vlprompt REC task lists 1"


@dataclass(frozen=True)
class RefSample:
    """One referring expression and its target object."""

    sample_id: int  # MDETR: the image entry's id; refer: the sentence's sent_id
    image: str  # COCO file name, under image_root when the reader was given one
    width: int
    height: int
    expression: str
    bbox: tuple[float, float, float, float]  # the target as COCO stores it: x, y, w, h (pixels)
    category_id: int  # COCO category of the target
    supercategory: str  # its COCO super-category, e.g. "kitchen"
    split: str  # train, val, testA, testB or test
    dataset: str  # refcoco, refcoco+ or refcocog
    image_id: int  # COCO image id
    ann_id: int  # COCO annotation id of the target
    ref_id: int | None  # refer's ref id; MDETR's files do not keep it
    layout: str  # "mdetr" or "refer"
    supercategory_id: int  # the super-category's id in the task sequence (COCO: LPI's 1 person ... 12 indoor)
    task: int  # index of its task in the sequence (COCO, LPI's order: 0 = appliance ... 11 = person)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The target box ``(x1, y1, x2, y2)`` in pixels."""
        x, y, w, h = self.bbox
        return (x, y, x + w, y + h)


# ---- field checks shared by both layouts ---------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(record: dict, key: str, where: str, positive: bool = False) -> int:
    v = record.get(key)
    if not _is_int(v) or (positive and v <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise DataError(f"{where}: {key!r} must be {kind}, got {v!r}")
    return v


def _text(record: dict, key: str, where: str) -> str:
    v = record.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {v!r}")
    return v


def _record(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise DataError(f"{where}: expected an object, got {type(v).__name__}")
    return v


def _bbox(ann: dict, where: str) -> tuple[float, float, float, float]:
    b = ann.get("bbox")
    if (
        not isinstance(b, list | tuple)
        or len(b) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b)
    ):
        raise DataError(f"{where}: 'bbox' must be four finite numbers [x, y, w, h], got {b!r}")
    if b[2] < 0 or b[3] < 0:
        raise DataError(f"{where}: bbox {list(b)} has a negative width or height")
    return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))


def _categories(raw: Any, where: str) -> dict[int, str]:
    """COCO ``categories`` -> ``{category id: super-category}``."""
    if not isinstance(raw, list):
        raise DataError(f"{where}: 'categories' must be a list")
    out = {}
    for i, cat in enumerate(raw):
        cwhere = f"{where}: categories[{i}]"
        cat = _record(cat, cwhere)
        out[_int(cat, "id", cwhere)] = _text(cat, "supercategory", cwhere)
    return out


def task_lookup(tasks: Sequence[TaskSpec] | None = None) -> dict[str, tuple[int, int]]:
    """``{super-category name: (its id, task index)}`` of a task sequence whose task names are super-categories
    (default: LPI's 12 COCO tasks); a task of several categories has no single super-category and is refused."""
    tasks = coco_task_sequence() if tasks is None else tasks
    multi = [t.name for t in tasks if len(t.categories) != 1]
    if multi:
        raise DataError(f"grounding tasks are single super-categories; task(s) {multi} join several")
    return {t.name: (t.categories[0], t.index) for t in tasks}


def _supercategory(
    category_id: int, categories: dict[int, str], where: str, source: Path, lookup: dict[str, tuple[int, int]]
) -> tuple[str, int, int]:
    """``(super-category name, id, task index)`` of a category."""
    if category_id not in categories:
        raise DataError(f"{where}: category_id {category_id} is not among the categories of {source}")
    name = categories[category_id]
    if name not in lookup:
        raise DataError(
            f"{where}: category {category_id} has super-category {name!r}, not one of the task sequence's "
            f"{len(lookup)} ({', '.join(lookup)})"
        )
    return (name, *lookup[name])


def _image_file(img: dict, where: str, image_root: str | Path | None) -> tuple[str, int, int]:
    name = _text(img, "file_name", where)
    path = str(Path(image_root) / name) if image_root is not None else name
    return path, _int(img, "width", where, positive=True), _int(img, "height", where, positive=True)


def _coco_parts(data: Any, path: Path, kind: str) -> tuple[list, list, dict[int, str]]:
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DataError(f"{path}: the {kind} format needs 'images' and 'annotations' lists and 'categories'")
    return data["images"], data["annotations"], _categories(data.get("categories"), str(path))


# ---- MDETR layout -------------------------------------------------------------------------------------------------
def mdetr_file_split(path: str | Path) -> tuple[str, str] | None:
    """``(dataset, split)`` from an MDETR file name (``finetune_refcoco+_testA.json``), else None."""
    found = _MDETR_NAME.match(Path(path).name)
    return (found["dataset"], found["split"]) if found else None


def read_mdetr_refexp(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    tasks: Sequence[TaskSpec] | None = None,
) -> list[RefSample]:
    """The samples of an MDETR ``finetune_<dataset>_<split>.json`` file, in file order.

    ``split`` overrides the split the file name gives (a file named otherwise needs it). Every image entry must
    have exactly one annotation (MDETR's evaluator asserts the same). ``tasks``: see :func:`task_lookup`.
    """
    path = Path(path)
    lookup = task_lookup(tasks)
    named = mdetr_file_split(path)
    split = split or (named[1] if named else None)
    if not split:
        raise DataError(f"{path}: cannot tell the split from the file name (finetune_<dataset>_<split>.json); pass it")
    images, annotations, categories = _coco_parts(read_json(path, "MDETR referring-expression file"), path,
                                                  "MDETR referring-expression file")  # fmt: skip
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for j, ann in enumerate(annotations):
        where = f"{path}: annotations[{j}]"
        by_image.setdefault(_int(_record(ann, where), "image_id", where), []).append((j, ann))
    samples, seen = [], set()
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = _int(_record(img, where), "id", where)
        where = f"{where} (id {image_id})"
        if image_id in seen:
            raise DataError(f"{where}: duplicate image id")
        seen.add(image_id)
        file, width, height = _image_file(img, where, image_root)
        expression = _text(img, "caption", where)
        targets = by_image.get(image_id, [])
        if len(targets) != 1:
            raise DataError(f"{where}: {len(targets)} annotations; a referring expression has exactly one target")
        j, ann = targets[0]
        awhere = f"{path}: annotations[{j}] (image id {image_id})"
        category_id = _int(ann, "category_id", awhere)
        supercategory, supercategory_id, task = _supercategory(category_id, categories, awhere, path, lookup)
        samples.append(RefSample(
            sample_id=image_id, image=file, width=width, height=height, expression=expression,
            bbox=_bbox(ann, awhere), category_id=category_id, supercategory=supercategory, split=split,
            dataset=str(img.get("dataset_name") or (named[0] if named else "")),
            image_id=_int(img, "original_id", where), ann_id=_int(ann, "original_id", awhere), ref_id=None,
            layout="mdetr", supercategory_id=supercategory_id, task=task,
        ))  # fmt: skip
    orphans = sorted(set(by_image) - seen)
    if orphans:
        j = by_image[orphans[0]][0][0]
        raise DataError(f"{path}: annotations[{j}] refers to image id {orphans[0]}, which is not in 'images'")
    return samples


# ---- refer toolkit layout -------------------------------------------------------------------------------------------
def refer_files(folder: str | Path, split_by: str | None = None) -> tuple[Path, Path]:
    """``(refs pickle, instances.json)`` of a refer dataset folder; ``split_by`` defaults to the dataset's usual one
    (:data:`REFER_SPLIT_BY`), else to the folder's only ``refs(*).p``."""
    folder = Path(folder)
    if split_by is None:
        split_by = REFER_SPLIT_BY.get(folder.name)
    if split_by is None:
        found = sorted(folder.glob("refs(*).p"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise DataError(f"{folder}: cannot choose a refs(<split_by>).p file (found: {names}); pass split_by")
        return found[0], folder / "instances.json"
    return folder / f"refs({split_by}).p", folder / "instances.json"


def read_refs_pickle(path: str | Path) -> list[dict]:
    """A refer toolkit ``refs(*).p``: plain dicts and lists only (no pickled object can run code)."""
    # Python 2's cPickle wrote text as ``str`` (bytes) or ``unicode``; utf-8 decodes the former as the ASCII the
    # released files hold and as UTF-8 otherwise, where latin1 would garble any non-ASCII expression.
    refs = load_pickle(Path(path), encoding="utf-8", kind="refer refs pickle")
    if not isinstance(refs, list):
        raise DataError(f"{path}: a refs pickle holds a list of refs, got {type(refs).__name__}")
    return refs


def read_refer(
    folder: str | Path,
    split: str,
    split_by: str | None = None,
    image_root: str | Path | None = None,
    dataset: str | None = None,
    tasks: Sequence[TaskSpec] | None = None,
) -> list[RefSample]:
    """The samples of one split of a refer toolkit folder (``refs(<split_by>).p`` + ``instances.json``), one per
    sentence, refs in file order. ``dataset`` defaults to the folder's name (``refcoco``, ``refcoco+``, ...);
    ``tasks``: see :func:`task_lookup`."""
    folder = Path(folder)
    lookup = task_lookup(tasks)
    refs_path, instances_path = refer_files(folder, split_by)
    refs = read_refs_pickle(refs_path)
    images, annotations, categories = _coco_parts(read_json(instances_path, "COCO instances file"),
                                                  instances_path, "COCO instances file")  # fmt: skip
    image_by_id, ann_by_id = {}, {}
    for key, rows, out in (("images", images, image_by_id), ("annotations", annotations, ann_by_id)):
        for i, row in enumerate(rows):
            where = f"{instances_path}: {key}[{i}]"
            out[_int(_record(row, where), "id", where)] = (where, row)
    dataset = dataset or folder.name
    samples: list[RefSample] = []
    splits: set[str] = set()
    for i, ref in enumerate(refs):
        where = f"{refs_path}: ref {i}"
        ref_split = _text(_record(ref, where), "split", where)
        splits.add(ref_split)
        if ref_split != split:
            continue
        ref_id = _int(ref, "ref_id", where)
        where = f"{where} (ref_id {ref_id})"
        image_id, ann_id = _int(ref, "image_id", where), _int(ref, "ann_id", where)
        category_id = _int(ref, "category_id", where)
        if image_id not in image_by_id:
            raise DataError(f"{where}: image {image_id} is not in {instances_path}")
        if ann_id not in ann_by_id:
            raise DataError(f"{where}: annotation {ann_id} is not in {instances_path}")
        image_where, image = image_by_id[image_id]
        file, width, height = _image_file(image, image_where, image_root)
        ann_where, ann = ann_by_id[ann_id]
        bbox = _bbox(ann, ann_where)
        supercategory, supercategory_id, task = _supercategory(category_id, categories, where, instances_path, lookup)
        sentences = ref.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise DataError(f"{where}: 'sentences' must be a non-empty list")
        for k, sent in enumerate(sentences):
            swhere = f"{where}: sentences[{k}]"
            sent = _record(sent, swhere)
            samples.append(RefSample(
                sample_id=_int(sent, "sent_id", swhere), image=file, width=width, height=height,
                expression=_text(sent, "sent", swhere), bbox=bbox, category_id=category_id,
                supercategory=supercategory, split=split, dataset=dataset, image_id=image_id, ann_id=ann_id,
                ref_id=ref_id, layout="refer", supercategory_id=supercategory_id, task=task,
            ))  # fmt: skip
    if split not in splits:
        raise DataError(f"{refs_path}: no refs of split {split!r} (it has: {', '.join(sorted(splits)) or 'none'})")
    return samples


# ---- LPI's per-task id lists ----------------------------------------------------------------------------------------
def _small(sample: RefSample, min_side: float) -> bool:
    return sample.bbox[2] <= min_side or sample.bbox[3] <= min_side


def build_task_lists(
    samples: Iterable[RefSample], min_side: float = MIN_SIDE, tasks: Sequence[TaskSpec] | None = None
) -> dict[str, Any]:
    """LPI's per-task sample-id lists for one split of one dataset, as a JSON-ready document.

    ``tasks[t]["ids"]`` are the ascending ``sample_id`` s of task ``t`` (LPI's order, or that of ``tasks``, the
    sequence the samples were read with); samples whose target has a side ``<= min_side`` pixels are left out of
    every task and listed under ``left_out_small_targets`` (GLIP's rule, as LPI's dataset applies it;
    ``min_side=0`` keeps all but zero-size targets).
    """
    samples = list(samples)
    if not samples:
        raise DataError("no referring-expression samples to divide into tasks")
    origin = Counter((s.dataset, s.split, s.layout) for s in samples)
    if len(origin) != 1:
        raise DataError(f"task lists are built per dataset split and layout; the samples mix {sorted(origin)}")
    samples_by_id(samples)  # the ids must identify samples
    lookup = task_lookup(tasks)
    tasks = coco_task_sequence() if tasks is None else list(tasks)
    for s in samples:
        if lookup.get(s.supercategory) != (s.supercategory_id, s.task):
            raise DataError(f"sample {s.sample_id} ({s.supercategory!r}, task {s.task}) was read with another task "
                            "sequence than the one given here")  # fmt: skip
    ids: list[list[int]] = [[] for _ in tasks]
    small = []
    for s in samples:
        (small if _small(s, min_side) else ids[s.task]).append(s.sample_id)
    dataset, split, layout = next(iter(origin))
    return {
        "format": _TASK_LISTS_FORMAT,
        "dataset": dataset,
        "split": split,
        "layout": layout,
        "ids_are": "MDETR image ids" if layout == "mdetr" else "refer sent_ids",
        "rule": "task = index, in the task sequence (default LPI's COCO order), of the super-category of the "
        "target's category (its first annotation's)",
        "min_side": min_side,
        "tasks": [
            {"task": t.index, "name": t.name, "supercategory_id": t.categories[0], "ids": sorted(ids[t.index])}
            for t in tasks
        ],
        "left_out_small_targets": sorted(small),
    }


def save_task_lists(
    samples: Iterable[RefSample], path: str | Path, min_side: float = MIN_SIDE, tasks: Sequence[TaskSpec] | None = None
) -> dict[str, Any]:
    """Build the task lists (:func:`build_task_lists`) and write them to ``path`` as JSON; returns the document."""
    doc = build_task_lists(samples, min_side, tasks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a file
    return doc


def read_task_lists(path: str | Path) -> list[list[int]]:
    """The per-task id lists of a file :func:`save_task_lists` wrote, in task order."""
    path = Path(path)
    doc = read_json(path, "task list file")
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != _TASK_LISTS_FORMAT or not isinstance(tasks, list):
        raise DataError(f"{path}: not a task list file written by vlprompt ({_TASK_LISTS_FORMAT!r})")
    out = []
    for t, entry in enumerate(tasks):
        ids = entry.get("ids") if isinstance(entry, dict) else None
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids) or entry.get("task") != t:
            raise DataError(f"{path}: tasks[{t}] must be {{'task': {t}, 'ids': [integers]}}")
        out.append(ids)
    return out


def samples_by_id(samples: Sequence[RefSample]) -> dict[int, RefSample]:
    """``{sample_id: sample}``; a repeated id is a DataError."""
    out: dict[int, RefSample] = {}
    for s in samples:
        if s.sample_id in out:
            raise DataError(f"sample id {s.sample_id} occurs more than once")
        out[s.sample_id] = s
    return out
