"""RefCOCO-family readers (MDETR JSON and refer toolkit layouts) on tiny fixtures written here, LPI's task lists."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from pathlib import Path

import pytest

from vlprompt.data.formats import DATASET_FORMATS
from vlprompt.data.grounding import (
    RefSample,
    build_task_lists,
    mdetr_file_split,
    read_mdetr_refexp,
    read_refer,
    read_task_lists,
    save_task_lists,
)
from vlprompt.errors import DataError

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    {"id": 78, "name": "microwave", "supercategory": "appliance"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]
IMAGES = [
    {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 480},
    {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 500, "height": 375},
]
ANNOTATIONS = [  # COCO instances: bbox is x, y, w, h
    {"id": 101, "image_id": 581857, "category_id": 1, "bbox": [10.0, 20.0, 100.0, 200.0], "area": 1, "iscrowd": 0},
    {"id": 102, "image_id": 581857, "category_id": 44, "bbox": [300.5, 40.0, 30.0, 60.0], "area": 1, "iscrowd": 0},
    {"id": 103, "image_id": 9, "category_id": 78, "bbox": [5.0, 5.0, 1.0, 50.0], "area": 1, "iscrowd": 0},
    {"id": 104, "image_id": 9, "category_id": 18, "bbox": [50.0, 60.0, 70.0, 80.0], "area": 1, "iscrowd": 0},
]


def _sent(sent_id: int, text: str) -> dict:
    return {"sent_id": sent_id, "sent": text, "raw": text.upper(), "tokens": text.split()}


REFS = [  # the refer toolkit's refs(unc).p records (file_name carries the annotation id, as in the real files)
    {"ref_id": 7, "ann_id": 102, "image_id": 581857, "category_id": 44, "split": "val",
     "file_name": "COCO_train2014_000000581857_102.jpg", "sent_ids": [70, 71],
     "sentences": [_sent(70, "bottle on the right"), _sent(71, "green bottle")]},
    {"ref_id": 3, "ann_id": 101, "image_id": 581857, "category_id": 1, "split": "train",
     "file_name": "COCO_train2014_000000581857_101.jpg", "sent_ids": [30], "sentences": [_sent(30, "man")]},
    {"ref_id": 5, "ann_id": 103, "image_id": 9, "category_id": 78, "split": "val",
     "file_name": "COCO_train2014_000000000009_103.jpg", "sent_ids": [50], "sentences": [_sent(50, "thin thing")]},
    {"ref_id": 4, "ann_id": 104, "image_id": 9, "category_id": 18, "split": "val",
     "file_name": "COCO_train2014_000000000009_104.jpg", "sent_ids": [41, 40],
     "sentences": [_sent(41, "dog"), _sent(40, "brown dog left")]},
]  # fmt: skip


def _instances() -> dict:
    return {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}


def _refer_folder(root: Path, refs: list | None = None, protocol: int = 2, name: str = "refcoco") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(REFS if refs is None else refs, protocol=protocol))
    (folder / "instances.json").write_text(json.dumps(_instances()))
    return folder


def _to_mdetr(split: str, refs: list = REFS, dataset: str = "refcoco", first_id: int = 1000) -> dict:
    """What MDETR's refexp_coco_format.py writes for ``split``: one image entry and one annotation per sentence."""
    coco_img, coco_ann = {i["id"]: i for i in IMAGES}, {a["id"]: a for a in ANNOTATIONS}
    images, annotations, next_id = [], [], first_id
    for ref in refs:
        if ref["split"] != split:
            continue
        for s in ref["sentences"]:
            img = coco_img[ref["image_id"]]
            images.append({"file_name": "_".join(ref["file_name"].split("_")[:-1]) + ".jpg", "height": img["height"],
                           "width": img["width"], "id": next_id, "original_id": ref["image_id"], "caption": s["sent"],
                           "dataset_name": dataset, "tokens_negative": [[0, 3]]})  # fmt: skip
            ann = coco_ann[ref["ann_id"]]
            annotations.append({"area": ann["area"], "iscrowd": 0, "image_id": next_id, "id": next_id + 5000,
                                "category_id": ref["category_id"], "bbox": ann["bbox"], "original_id": ref["ann_id"],
                                "tokens_positive": [[0, 3]]})  # fmt: skip
            next_id += 1
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}


def _mdetr_file(root: Path, split: str = "val", data: dict | None = None, name: str | None = None) -> Path:
    path = root / (name or f"finetune_refcoco_{split}.json")
    path.write_text(json.dumps(_to_mdetr(split) if data is None else data))
    return path


def _without_ids(s: RefSample) -> dict:
    d = dataclasses.asdict(s)
    for key in ("sample_id", "ref_id", "layout"):
        d.pop(key)
    return d


# ---- reading ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [0, 2])
def test_both_layouts_give_the_same_samples(tmp_path: Path, protocol: int):
    refer = read_refer(_refer_folder(tmp_path, protocol=protocol), "val", image_root="/coco/train2014")
    mdetr = read_mdetr_refexp(_mdetr_file(tmp_path), image_root="/coco/train2014")
    assert len(refer) == len(mdetr) == 5  # one sample per expression
    assert [_without_ids(s) for s in refer] == [_without_ids(s) for s in mdetr]
    assert [s.sample_id for s in mdetr] == [1000, 1001, 1002, 1003, 1004]  # MDETR image ids
    assert [s.sample_id for s in refer] == [70, 71, 50, 41, 40]  # refer sent_ids
    assert [s.ref_id for s in refer] == [7, 7, 5, 4, 4] and {s.ref_id for s in mdetr} == {None}


def test_sample_fields(tmp_path: Path):
    first = read_mdetr_refexp(_mdetr_file(tmp_path), image_root=tmp_path / "train2014")[0]
    assert first.image == str(tmp_path / "train2014" / "COCO_train2014_000000581857.jpg")
    assert (first.width, first.height) == (640, 480)
    assert first.expression == "bottle on the right"
    assert first.bbox == (300.5, 40.0, 30.0, 60.0)
    assert first.box == (300.5, 40.0, 330.5, 100.0)  # xyxy
    assert (first.category_id, first.supercategory, first.supercategory_id) == (44, "kitchen", 7)
    assert first.task == 6  # LPI's order: appliance, sports, outdoor, electronic, accessory, indoor, kitchen, ...
    assert (first.split, first.dataset, first.image_id, first.ann_id) == ("val", "refcoco", 581857, 102)
    by_text = {s.expression: s for s in read_refer(_refer_folder(tmp_path), "val")}
    assert by_text["thin thing"].task == 0 and by_text["dog"].task == 10  # appliance first, animal 11th
    assert by_text["dog"].image == "COCO_train2014_000000000009.jpg"  # no image_root: the COCO file name


def test_train_split_and_split_from_file_name(tmp_path: Path):
    train = read_refer(_refer_folder(tmp_path), "train")
    assert [(s.expression, s.task) for s in train] == [("man", 11)]  # person is LPI's last task
    assert mdetr_file_split("finetune_refcoco+_testA.json") == ("refcoco+", "testA")
    assert mdetr_file_split("finetune_refcocog_test.json") == ("refcocog", "test")
    assert mdetr_file_split("refs.json") is None
    odd = _mdetr_file(tmp_path, name="mine.json")
    assert {s.split for s in read_mdetr_refexp(odd, split="testB")} == {"testB"}
    with pytest.raises(DataError, match="cannot tell the split"):
        read_mdetr_refexp(odd)


def test_python2_str_pickle_decodes_utf8(tmp_path: Path):
    """Python 2's cPickle writes ``str`` as raw bytes (SHORT_BINSTRING); a non-ASCII expression must survive."""

    def py2(value) -> bytes:  # protocol 2 as Python 2 writes dicts, lists, str (bytes) and ints
        if isinstance(value, dict):
            return b"}" + b"".join(py2(k) + py2(v) + b"s" for k, v in value.items())
        if isinstance(value, list):
            return b"]" + b"".join(py2(v) + b"a" for v in value)
        if isinstance(value, str):
            raw = value.encode("utf-8")
            return b"U" + bytes([len(raw)]) + raw
        return b"J" + struct.pack("<i", value)

    ref = dict(REFS[0], sentences=[_sent(70, "the café bottle")], sent_ids=[70])
    folder = _refer_folder(tmp_path)
    (folder / "refs(unc).p").write_bytes(b"\x80\x02" + py2([ref]) + b".")
    assert [s.expression for s in read_refer(folder, "val")] == ["the café bottle"]


def test_refs_file_choice(tmp_path: Path):
    folder = _refer_folder(tmp_path, name="mine")
    assert len(read_refer(folder, "val")) == 5  # the folder's only refs(*).p
    (folder / "refs(google).p").write_bytes((folder / "refs(unc).p").read_bytes())
    with pytest.raises(DataError, match="cannot choose"):
        read_refer(folder, "val")
    assert len(read_refer(folder, "val", split_by="google")) == 5
    gfolder = _refer_folder(tmp_path, name="refcocog")  # refcocog defaults to refs(umd).p, which is missing
    with pytest.raises(DataError, match=r"refs\(umd\)\.p"):
        read_refer(gfolder, "val")


def test_a_planted_refs_pickle_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps([dict(REFS[0], sentences=Planted())], protocol=2)
    pickle.loads(payload)  # an unrestricted load really runs it, so the refusal below means something
    assert marker.exists()
    marker.unlink()
    folder = _refer_folder(tmp_path)
    (folder / "refs(unc).p").write_bytes(payload)
    with pytest.raises(DataError, match="refusing to unpickle") as err:
        read_refer(folder, "val")
    assert str(folder / "refs(unc).p") in str(err.value)
    assert not marker.exists()


# ---- bad input --------------------------------------------------------------------------------------------------
def _edit_mdetr(change):
    data = _to_mdetr("val")
    change(data)
    return data


MDETR_CASES = {
    "negative width": (lambda d: d["annotations"][1].update(bbox=[1, 2, -3, 4]), r"annotations\[1\].*negative"),
    "short bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\].*four finite"),
    "unknown category": (lambda d: d["annotations"][2].update(category_id=999), r"annotations\[2\].*category_id 999"),
    "unknown supercategory": (lambda d: d["categories"].append({"id": 5, "supercategory": "weather"})
                              or d["annotations"][0].update(category_id=5), "super-category 'weather'"),
    "no annotation": (lambda d: d["annotations"].pop(3), r"images\[3\] \(id 1003\): 0 annotations"),
    "two annotations": (lambda d: d["annotations"].append(dict(d["annotations"][0], id=1)), r"images\[0\].*2 annot"),
    "orphan annotation": (lambda d: d["annotations"].append(dict(d["annotations"][0], image_id=77)), "image id 77"),
    "missing caption": (lambda d: d["images"][4].pop("caption"), r"images\[4\].*'caption'"),
    "bad size": (lambda d: d["images"][0].update(width=0), r"images\[0\].*'width'"),
    "duplicate id": (lambda d: d["images"].append(d["images"][0]), "duplicate image id"),
    "not an object": (lambda d: d["images"].insert(0, "x"), r"images\[0\]: expected an object"),
    "no categories": (lambda d: d.pop("categories"), "'categories' must be a list"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MDETR_CASES))
def test_malformed_mdetr_files_name_file_and_record(tmp_path: Path, case: str):
    change, match = MDETR_CASES[case]
    path = _mdetr_file(tmp_path, data=_edit_mdetr(change))
    with pytest.raises(DataError, match=match) as err:
        read_mdetr_refexp(path)
    assert str(path) in str(err.value)


def test_unreadable_mdetr_files(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        read_mdetr_refexp(tmp_path / "finetune_refcoco_val.json")
    broken = tmp_path / "finetune_refcoco_val.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        read_mdetr_refexp(broken)
    broken.write_text("[]")
    with pytest.raises(DataError, match="the MDETR referring-expression file format needs 'images'"):
        read_mdetr_refexp(broken)


REFER_CASES = {
    "unknown annotation": (lambda r: r[0].update(ann_id=999), r"ref 0 \(ref_id 7\): annotation 999"),
    "unknown image": (lambda r: r[2].update(image_id=999), r"ref 2 \(ref_id 5\): image 999"),
    "unknown category": (lambda r: r[3].update(category_id=999), r"ref 3 \(ref_id 4\): category_id 999"),
    "no sentences": (lambda r: r[0].update(sentences=[]), r"ref 0 .*'sentences'"),
    "sentence without text": (lambda r: r[3]["sentences"][1].pop("sent"), r"ref 3 .*sentences\[1\].*'sent'"),
    "no split": (lambda r: r[1].pop("split"), r"ref 1: 'split'"),
    "not a dict": (lambda r: r.insert(0, ["x"]), "ref 0: expected an object"),
}


@pytest.mark.parametrize("case", list(REFER_CASES))
def test_malformed_refer_folders_name_file_and_record(tmp_path: Path, case: str):
    change, match = REFER_CASES[case]
    refs = json.loads(json.dumps(REFS))
    change(refs)
    folder = _refer_folder(tmp_path, refs)
    with pytest.raises(DataError, match=match) as err:
        read_refer(folder, "val")
    assert str(folder / "refs(unc).p") in str(err.value)


def test_refer_instances_and_split_errors(tmp_path: Path):
    folder = _refer_folder(tmp_path)
    with pytest.raises(DataError, match=r"no refs of split 'testA' \(it has: train, val\)"):
        read_refer(folder, "testA")
    instances = _instances()
    instances["annotations"] = [dict(ANNOTATIONS[0]), dict(ANNOTATIONS[1], bbox=[0, 0, 5, -1])] + ANNOTATIONS[2:]
    (folder / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(DataError, match=r"instances\.json: annotations\[1\]: bbox .* negative"):
        read_refer(folder, "val")
    (folder / "instances.json").unlink()
    with pytest.raises(DataError, match="COCO instances file not found"):
        read_refer(folder, "val")
    (folder / "refs(unc).p").unlink()
    with pytest.raises(DataError, match=r"refs pickle not found: .*refs\(unc\)\.p"):
        read_refer(folder, "val")


# ---- LPI's task lists -------------------------------------------------------------------------------------------
def test_task_lists_follow_lpis_rules(tmp_path: Path):
    samples = read_mdetr_refexp(_mdetr_file(tmp_path))
    doc = build_task_lists(samples)
    assert [t["name"] for t in doc["tasks"]] == [
        "appliance", "sports", "outdoor", "electronic", "accessory", "indoor",
        "kitchen", "furniture", "vehicle", "food", "animal", "person",
    ]  # fmt: skip
    ids = {t["name"]: t["ids"] for t in doc["tasks"]}
    assert ids["kitchen"] == [1000, 1001] and ids["animal"] == [1003, 1004]
    assert ids["appliance"] == [] and doc["left_out_small_targets"] == [1002]  # 1 pixel wide: GLIP drops it
    assert (doc["dataset"], doc["split"], doc["ids_are"]) == ("refcoco", "val", "MDETR image ids")
    assert build_task_lists(samples, min_side=0.5)["tasks"][0]["ids"] == [1002]
    refer = build_task_lists(read_refer(_refer_folder(tmp_path), "val"))
    assert {t["name"]: t["ids"] for t in refer["tasks"]}["animal"] == [40, 41]  # ascending, as LPI sorts ids


def test_task_lists_round_trip(tmp_path: Path):
    samples = read_mdetr_refexp(_mdetr_file(tmp_path))
    path = tmp_path / "run" / "tasks_refcoco_val.json"
    doc = save_task_lists(samples, path)
    assert json.loads(path.read_text()) == doc
    lists = read_task_lists(path)
    assert len(lists) == 12 and lists[6] == [1000, 1001]
    path.write_text(json.dumps({"tasks": []}))
    with pytest.raises(DataError, match="not a task list file"):
        read_task_lists(path)


def test_task_lists_refuse_mixed_or_repeated_samples(tmp_path: Path):
    val = read_mdetr_refexp(_mdetr_file(tmp_path))
    train = read_mdetr_refexp(_mdetr_file(tmp_path, "train", _to_mdetr("train", first_id=0)))
    with pytest.raises(DataError, match="mix"):
        build_task_lists(val + train)
    with pytest.raises(DataError, match="sample id 1000 occurs more than once"):
        build_task_lists(val + val[:1])
    with pytest.raises(DataError, match="no referring-expression samples"):
        build_task_lists([])


def test_formats_are_listed():
    assert "MDETR" in DATASET_FORMATS["mdetr-refexp"] and "refs(unc" in DATASET_FORMATS["refer"]
