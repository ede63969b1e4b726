"""One rule for where a split's images are (data.sources.split_files), and the colour/monochrome trap of issue 15:
two datasets whose files share names must never be mixed up silently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from torchvision.transforms import ToTensor

from vlprompt.config import DataConfig
from vlprompt.data.karpathy import implied_image_root
from vlprompt.data.sources import VisualSpec, data_locations, eval_set, split_files, train_set
from vlprompt.errors import ConfigError, DataError

NAMES = ["e1.png", "e2.png", "e3.png"]
SPEC = VisualSpec(ToTensor(), ToTensor(), 8, (0.0,) * 3, (1.0,) * 3)


def _dataset(folder: Path, mode: str) -> Path:
    """Three 8x8 images named like the other dataset's: saturated colours, or their grey rendering."""
    folder.mkdir(parents=True)
    for i, name in enumerate(NAMES):
        colour = [(220, 20, 20), (20, 200, 20), (20, 20, 220)][i]
        Image.new("RGB", (8, 8), colour).convert(mode).convert("RGB").save(folder / name)
    records = [{"image": n, "caption": [f"emoji {i}"]} for i, n in enumerate(NAMES)]
    (folder / "test.json").write_text(json.dumps(records))
    (folder / "train.json").write_text(
        json.dumps([{"image": n, "caption": f"emoji {i}"} for i, n in enumerate(NAMES)])
    )
    return folder


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    return _dataset(tmp_path / "colour", "RGB"), _dataset(tmp_path / "mono", "L")


def _is_grey(item) -> bool:
    image = item[0]
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())


def test_train_on_colour_test_on_monochrome_is_never_silently_colour(two: tuple[Path, Path]) -> None:
    colour, mono = two
    data = DataConfig(root=str(colour), train="train.json", test=str(mono / "test.json"))
    with pytest.raises(DataError, match=r"exist both under the image root .*colour.* and under .*mono.*images_from"):
        eval_set(data, "test", SPEC)
    # the training split's file sits in data.root itself: one place, no question
    assert all(p.parent == colour for p in train_set(data, SPEC).image_paths)

    for chosen in (
        DataConfig(root=str(colour), train="train.json", test=str(mono / "test.json"), images_from="annotation"),
        DataConfig(train=str(colour / "train.json"), test=str(mono / "test.json")),  # no data.root: per file
    ):
        gallery = eval_set(chosen, "test", SPEC)
        assert [p.parent for p in gallery.dataset.gallery.image_paths] == [mono] * 3
        assert all(_is_grey(gallery.dataset[i]) for i in range(3))
        assert all(p.parent == colour for p in train_set(chosen, SPEC).image_paths)

    # an explicit choice of data.root is honoured (and only then are the colour files used)
    forced = DataConfig(root=str(colour), test=str(mono / "test.json"), images_from="root")
    gallery = eval_set(forced, "test", SPEC)
    assert not any(_is_grey(gallery.dataset[i]) for i in range(3))


def test_the_same_files_through_links_are_not_ambiguous(tmp_path: Path) -> None:
    images = _dataset(tmp_path / "images", "RGB")
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in NAMES:  # the annotation's folder links to the very same files
        os.symlink(images / name, notes / name)
    (notes / "test.json").write_text((images / "test.json").read_text())
    gallery = eval_set(DataConfig(root=str(images), test=str(notes / "test.json")), "test", SPEC)
    assert gallery.num_visual == 3
    linked_root = tmp_path / "link"
    os.symlink(images, linked_root)  # data.root spelled through a link to the annotation's folder
    assert eval_set(DataConfig(root=str(linked_root), test="test.json"), "test", SPEC).num_visual == 3


def test_images_only_beside_the_annotation_file_say_where_they_are(two: tuple[Path, Path], tmp_path: Path) -> None:
    _, mono = two
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"none of the images exist under .*empty; they are under .*mono"):
        eval_set(DataConfig(root=str(empty), test=str(mono / "test.json")), "test", SPEC)


def test_without_root_paths_resolve_where_the_annotation_file_implies(tmp_path: Path) -> None:
    # the world's layout: annotation files one folder below the root their image paths start from
    root = tmp_path / "world"
    (root / "images").mkdir(parents=True)
    (root / "retrieval").mkdir()
    for name in NAMES:
        Image.new("RGB", (8, 8)).save(root / "images" / name)
    ann = root / "retrieval" / "test.json"
    ann.write_text(json.dumps([{"image": f"images/{n}", "caption": "x"} for n in NAMES]))
    assert implied_image_root(ann) == root
    files = split_files(DataConfig(test=str(ann)), "test")
    assert files.images == root and not files.check_ambiguity
    # with data.root, a relative annotation path resolves under it, and the root is the image root
    files = split_files(DataConfig(root=str(root), test="retrieval/test.json"), "test")
    assert files.annotation == ann and files.images == root and files.check_ambiguity
    assert eval_set(DataConfig(root=str(root), test="retrieval/test.json"), "test", SPEC).num_visual == 3
    # a file beside its images: its own folder
    beside = _dataset(tmp_path / "flat", "RGB")
    assert implied_image_root(beside / "test.json") == beside
    assert split_files(DataConfig(test=str(beside / "test.json")), "test").images == beside


def test_split_files_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="images_from=root needs data.root"):
        split_files(DataConfig(test="t.json", images_from="root"), "test")
    with pytest.raises(ConfigError, match="data.val is empty"):
        split_files(DataConfig(test="t.json"), "val")
    with pytest.raises(DataError, match="annotation file not found"):
        split_files(DataConfig(test=str(tmp_path / "nope.json")), "test")


def test_data_locations_record_every_split_absolutely(two: tuple[Path, Path], tmp_path: Path) -> None:
    colour, mono = two
    data = DataConfig(root=str(colour), train="train.json", test=str(mono / "test.json"), images_from="annotation")
    where = data_locations(data)
    assert where["root"] == str(colour.resolve()) and "val" not in where
    assert where["train"] == {"annotation": str(colour / "train.json"), "images": str(colour)}
    assert where["test"] == {"annotation": str(mono / "test.json"), "images": str(mono)}
    missing = data_locations(DataConfig(test=str(tmp_path / "nope.json")))
    assert "annotation file not found" in missing["test"]["error"]
    video = data_locations(DataConfig(format="msrvtt", root=str(tmp_path), test="default"))
    assert video["test"] == {"annotation": "default", "videos": str((tmp_path / "videos").resolve())}
