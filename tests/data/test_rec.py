"""Referring-expression detector inputs: which files a config names, the squashed image, the box frame, bad images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from data.rec_setup import write_rec_set
from data.test_grounding import _refer_folder
from vlprompt.config import load_config
from vlprompt.data import collate_skip_none
from vlprompt.data.continual import read_tasks_file
from vlprompt.data.rec import RecDataset, distinct_images, read_rec_split, squash_transform
from vlprompt.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def rec_root(tmp_path: Path) -> Path:
    return write_rec_set(tmp_path / "rec")


def _cfg(root: Path, *extra: str):
    files = ["data.train=ann/finetune_toy_train.json", "data.test=ann/finetune_toy_test.json"]
    return load_config(None, [f"data.root={root}", "data.format=mdetr-refexp", *files, "grounding.images=images",
                              *extra])  # fmt: skip


def test_read_rec_split_resolves_files_and_images_under_data_root(rec_root: Path):
    cfg = _cfg(rec_root)
    tasks = read_tasks_file(rec_root / "tasks.json")
    samples = read_rec_split(cfg.data, cfg.grounding, "train", tasks)
    assert len(samples) == 8 and {s.split for s in samples} == {"train"}
    assert samples[0].image == str(rec_root / "images" / "train_1_0.png")
    assert [s.task for s in samples] == [0] * 4 + [1] * 4  # animal, then vehicle: the task file's order
    with pytest.raises(ConfigError, match="data.val is empty"):
        read_rec_split(cfg.data, cfg.grounding, "val", tasks)
    wrong = _cfg(rec_root, "grounding.dataset=refcoco")
    with pytest.raises(ConfigError, match=r"holds dataset\(s\) \['toy'\], not grounding.dataset='refcoco'"):
        read_rec_split(wrong.data, wrong.grounding, "train", tasks)
    refer = _cfg(rec_root, "data.format=refer", "data.train=train")
    with pytest.raises(ConfigError, match="needs grounding.dataset"):
        read_rec_split(refer.data, refer.grounding, "train", tasks)
    other = _cfg(rec_root, "data.format=karpathy")
    with pytest.raises(ConfigError, match="not a referring-expression format"):
        read_rec_split(other.data, other.grounding, "train", tasks)


def test_items_squash_the_image_and_keep_the_box_in_the_original_frame(rec_root: Path):
    cfg = _cfg(rec_root)
    samples = read_rec_split(cfg.data, cfg.grounding, "test", read_tasks_file(rec_root / "tasks.json"))
    data = RecDataset(samples, (32, 32), MEAN, STD)
    image, expression, box, size, task, index = data[4]
    s = samples[4]
    assert image.shape == (3, 32, 32)  # a 96x64 image squashed to the square, not cropped
    assert expression == s.expression and task == s.task == 1 and index == 4
    x, y, w, h = s.bbox
    assert box.tolist() == [x, y, x + w, y + h] and size.tolist() == [96.0, 64.0]
    # squashing = resizing both sides: the whole picture survives (a crop would lose the left block's columns)
    direct = squash_transform((32, 32), MEAN, STD)(Image.open(s.image).convert("RGB"))
    assert torch.allclose(image, direct)
    left_block = image[:, 10:20, 2:12].mean(dim=(1, 2))  # the left block is red or blue or green, not grey
    grey = (128 / 255 - 0.5) / 0.25
    assert float((left_block - grey).abs().max()) > 0.5


def test_missing_and_undecodable_images_are_skipped_or_refused(rec_root: Path):
    cfg = _cfg(rec_root)
    samples = read_rec_split(cfg.data, cfg.grounding, "test", read_tasks_file(rec_root / "tasks.json"))
    (rec_root / "images" / "test_1_0.png").unlink()
    (rec_root / "images" / "test_1_1.png").write_bytes(b"\x00not a png")
    data = RecDataset(samples, (16, 16), MEAN, STD)
    assert len(data) == len(samples) - 1 and data.bad_samples.counts == {"missing": 1}
    assert data[0] is None and data.bad_samples.counts == {"missing": 1, "unreadable": 1}
    batch = collate_skip_none([data[i] for i in range(3)])
    assert batch[0].shape == (2, 3, 16, 16) and batch[5].tolist() == [1, 2]
    with pytest.raises(DataError, match="missing"):
        RecDataset(samples, (16, 16), MEAN, STD, strict=True)
    with pytest.raises(DataError, match="none of the 1 samples' images exist"):
        RecDataset(samples[:1], (16, 16), MEAN, STD)


def test_distinct_images_keeps_the_first_expression_of_each_image(rec_root: Path):
    cfg = _cfg(rec_root)
    samples = read_rec_split(cfg.data, cfg.grounding, "train", read_tasks_file(rec_root / "tasks.json"))
    twice = [samples[0], samples[1], samples[0]]
    assert distinct_images(twice) == [samples[0], samples[1]]


def test_the_refer_layout_reads_the_folder_grounding_dataset_names(tmp_path: Path):
    _refer_folder(tmp_path)  # tmp_path/refcoco/{refs(unc).p, instances.json}, COCO's super-categories
    cfg = load_config(None, [f"data.root={tmp_path}", "data.format=refer", "data.val=val", "grounding.dataset=refcoco",
                             "grounding.images=train2014"])  # fmt: skip
    samples = read_rec_split(cfg.data, cfg.grounding, "val")
    assert [s.sample_id for s in samples] == [70, 71, 50, 41, 40] and {s.dataset for s in samples} == {"refcoco"}
    assert samples[0].image == str(tmp_path / "train2014" / "COCO_train2014_000000581857.jpg")
    google = load_config(None, [f"data.root={tmp_path}", "data.format=refer", "data.val=val",
                                "grounding.dataset=refcoco", "grounding.split_by=google"])  # fmt: skip
    with pytest.raises(DataError, match=r"refs\(google\)\.p"):
        read_rec_split(google.data, google.grounding, "val")
