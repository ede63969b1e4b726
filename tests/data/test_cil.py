"""Class-incremental data: seeded disjoint class splits, split files, CIFAR-100 / ImageNet-R / CUB / folder readers."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlprompt.data.cil import (
    ClassSplit,
    LabeledImages,
    build_cil_datasets,
    check_split,
    holdout_split,
    make_class_split,
    read_cifar100,
    read_cil_sets,
    read_class_split,
    read_cub200,
    subsample_per_class,
)
from vlprompt.errors import ConfigError, DataError


def _cil(**kw) -> SimpleNamespace:
    base = dict(classes="", eval_split="test", test_fraction=0.2, holdout_seed=0, train_transform="eval",
                max_train_per_class=0)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def _data(fmt: str, root: Path, **kw) -> SimpleNamespace:
    return SimpleNamespace(format=fmt, root=str(root), train=kw.get("train", ""), val="", test=kw.get("test", ""),
                           strict=False)  # fmt: skip


def test_seeded_splits_are_disjoint_cover_every_class_and_reproduce():
    a, b = make_class_split(100, 10, seed=3), make_class_split(100, 10, seed=3)
    assert a == b and a.num_tasks == 10 and a.task_sizes == [10] * 10
    assert sorted(a.order) == list(range(100)) and len(set(a.order)) == 100
    assert make_class_split(100, 10, seed=4).order != a.order  # the seed matters
    assert make_class_split(100, 10, seed=3, shuffle=False).order == tuple(range(100))
    uneven = make_class_split(96, 10, seed=0)
    assert sum(uneven.task_sizes) == 96 and set(uneven.task_sizes) == {9, 10}
    assert uneven.offsets[0] == 0 and uneven.offsets[-1] == 96
    position = uneven.position_of()
    assert [position[c] for c in uneven.order] == list(range(96))


def test_split_checks_and_files(tmp_path: Path):
    with pytest.raises(DataError, match="not disjoint"):
        check_split(ClassSplit(((0, 1), (1, 2))), 3)
    with pytest.raises(DataError, match="missing \\[2\\]"):
        check_split(ClassSplit(((0,), (1,))), 3)
    with pytest.raises(ConfigError, match="num_tasks"):
        make_class_split(5, 6, seed=0)
    split = make_class_split(12, 3, seed=1)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split.to_json()))
    assert read_class_split(path, 12).tasks == split.tasks
    path.write_text(json.dumps([[0, 1], [2]]))  # a plain list of lists
    assert read_class_split(path, 3).tasks == ((0, 1), (2,))
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_class_split(path, 3)
    assert split.truncated(2).num_classes == 8


def test_world_split_file_reads(small_world: Path):
    classes = json.loads((small_world / "classification" / "classes.json").read_text())["classes"]
    split = read_class_split(small_world / "classification" / "cil_tasks.json", len(classes))
    assert split.num_tasks == 10 and split.num_classes == len(classes) == 96


def _write_cifar(root: Path, n: int = 6) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        data = rng.randint(0, 255, (n, 3072), dtype=np.uint8)
        data[0, :1024] = 255  # image 0: red plane saturated
        data[0, 1024:] = 0
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [i % 3 for i in range(n)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"aquarium_fish", b"baby"]}, f)


def test_cifar100_pickles(tmp_path: Path):
    _write_cifar(tmp_path)
    images, labels, classes = read_cifar100(tmp_path, "train")
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert tuple(images[0, 5, 5]) == (255, 0, 0)  # channel planes became HWC
    assert labels == [0, 1, 2, 0, 1, 2] and classes.names == ("apple", "aquarium fish", "baby")
    sets = read_cil_sets(_data("cifar100", tmp_path), _cil())
    assert len(sets.test[1]) == 6
    ds = LabeledImages(*sets.train, transform=None)
    image, label, index = ds[0]
    assert isinstance(image, Image.Image) and label == 0 and index == 0
    with pytest.raises(DataError, match="pickle not found"):
        read_cifar100(tmp_path / "nothing", "train")


# The files from the CIFAR site were written by Python 2's cPickle (protocol 2) with numpy 1: byte strings, and
# the array rebuilt by numpy.core.multiarray._reconstruct + ndarray.__setstate__. Written opcode by opcode here.
def _py2_str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def _py2_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _py2(value) -> bytes:
    if isinstance(value, bytes):
        return _py2_str(value)
    if isinstance(value, int):
        return _py2_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_py2(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in value.items()) + b"u"
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8
    # _reconstruct(ndarray, (0,), 'b') [GLOBAL, GLOBAL, TUPLE1, TUPLE3, REDUCE], then BUILD with
    # (1, shape, dtype('u1', 0, 1) + its state, False, raw bytes)
    reconstruct = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    empty = reconstruct + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R(" + _py2_int(3)
             + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb")  # fmt: skip
    shape = b"(" + b"".join(_py2_int(d) for d in value.shape) + b"t"
    return empty + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(value.tobytes()) + b"tb"


def test_cifar100_python2_files_as_published(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.random.RandomState(1).randint(0, 256, (4, 3072)).astype(np.uint8)
    batch = {b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"], b"batch_label": b"training batch 1 of 1",
             b"fine_labels": [3, 1, 4, 1], b"coarse_labels": [0, 0, 1, 1], b"data": data}  # fmt: skip
    (folder / "train").write_bytes(b"\x80\x02" + _py2(batch) + b".")
    meta = {b"fine_label_names": [b"apple", b"aquarium_fish", b"baby", b"bear", b"beaver"],
            b"coarse_label_names": [b"x", b"y"]}  # fmt: skip
    (folder / "meta").write_bytes(b"\x80\x02" + _py2(meta) + b".")
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "train").read_bytes()
    images, labels, classes = read_cifar100(tmp_path, "train")
    assert np.array_equal(images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels == [3, 1, 4, 1] and classes.names[1] == "aquarium fish"


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_cifar100_pickles_rewritten_by_python3(tmp_path: Path, protocol: int):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    (folder / "test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [1, 0], b"batch_label": b""},
                                               protocol=protocol))  # fmt: skip
    images, labels, _ = read_cifar100(tmp_path, "test")
    assert images.shape == (2, 32, 32, 3) and labels == [1, 0] and int(images[1, 0, 0, 0]) == 3072 % 256


def test_cifar100_with_objects_is_refused(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0],
                                                 b"when": __import__("datetime").date(2020, 1, 1)}))  # fmt: skip
    with pytest.raises(DataError, match=r"train: refusing to unpickle datetime.date"):
        read_cifar100(tmp_path, "train")
    (folder / "train").write_bytes(pickle.dumps({b"data": np.array([[None]], dtype=object), b"fine_labels": [0]}))
    with pytest.raises(DataError, match=r"train: 'data' is not an array of uint8 pixels"):
        read_cifar100(tmp_path, "train")
    (folder / "train").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match=r"train is not a CIFAR python pickle \(a list"):
        read_cifar100(tmp_path, "train")


def _png(path: Path, colour=(200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_cub_official_split(tmp_path: Path):
    root = tmp_path / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    (root).mkdir()
    (root / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    rows = [(1, names[0], "a.jpg", 1), (2, names[0], "b.jpg", 0), (3, names[1], "c.jpg", 1), (4, names[1], "d.jpg", 0)]
    (root / "images.txt").write_text("".join(f"{i} {c}/{f}\n" for i, c, f, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {names.index(c) + 1}\n" for i, c, _, _ in rows))
    for _, c, f, _ in rows:
        _png(root / "images" / c / f)
    paths, labels, classes = read_cub200(tmp_path, "train")
    assert [p.name for p in paths] == ["a.jpg", "c.jpg"] and labels == [0, 1]
    assert classes.names == ("Black footed Albatross", "Laysan Albatross")
    test_paths, test_labels, _ = read_cub200(root, "test")
    assert [p.name for p in test_paths] == ["b.jpg", "d.jpg"] and test_labels == [0, 1]
    with pytest.raises(DataError, match="not a CUB_200_2011 folder"):
        read_cub200(tmp_path / "empty", "train")


def test_seeded_holdout_is_per_class_disjoint_and_stable():
    paths = [Path(f"{c}_{i}.jpg") for c in range(3) for i in range(10)]
    labels = [c for c in range(3) for _ in range(10)]
    train = holdout_split(paths, labels, 0.2, seed=0, split="train")
    test = holdout_split(paths, labels, 0.2, seed=0, split="test")
    assert len(test[0]) == 6 and len(train[0]) == 24 and not set(train[0]) & set(test[0])
    assert sorted(test[1]) == [0, 0, 1, 1, 2, 2]
    assert holdout_split(paths, labels, 0.2, seed=0, split="test") == test
    assert holdout_split(paths, labels, 0.2, seed=1, split="test") != test
    with pytest.raises(ConfigError, match="test_fraction"):
        holdout_split(paths, labels, 1.5, seed=0, split="test")


def test_world_folders_with_class_file_and_restriction(small_world: Path):
    data = _data("imagefolder", small_world, train="classification/clean/train", test="classification/clean/test")
    sets = read_cil_sets(data, _cil(classes="classification/classes.json"))
    assert len(sets.classes) == 96 and sets.classes.names[0] == "red triangle"
    split = make_class_split(96, 10, seed=0).truncated(2)
    ds = build_cil_datasets(sets, data, _cil(), lambda im: np.asarray(im), lambda im: np.asarray(im)).restrict(split)
    assert ds.train is ds.train_eval  # train_transform: eval shares one dataset
    assert set(ds.train.labels.tolist()) == set(range(split.num_classes))  # positions, only the first two tasks
    first = ds.train.indices_of(range(split.offsets[0], split.offsets[1]))
    assert first and all(ds.train.labels[i] < split.offsets[1] for i in first)
    with pytest.raises(ConfigError, match="data.format"):
        read_cil_sets(_data("karpathy", small_world), _cil())


def test_subsample_per_class_keeps_the_first_n():
    sources, labels = subsample_per_class([f"f{i}" for i in range(6)], [0, 0, 0, 1, 1, 1], 2)
    assert sources == ["f0", "f1", "f3", "f4"] and labels == [0, 0, 1, 1]
    array, _ = subsample_per_class(np.zeros((6, 2, 2, 3), dtype=np.uint8), [0, 0, 0, 1, 1, 1], 1)
    assert array.shape[0] == 2
