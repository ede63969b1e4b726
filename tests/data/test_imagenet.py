"""ImageNet variants' label spaces (the 200-class subsets, V2's numeric folders) and generic class names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.data.classnames import (
    CIFAR100_CLASSES,
    ClassNames,
    imagenet_templates,
    imagenet_wnids,
    load_class_names,
    read_class_file,
    underscore_template,
    variant_classes,
)
from vlprompt.data.imagenet import ClassificationFolder, read_variant
from vlprompt.errors import ConfigError, DataError


def _tree(root: Path, folders: list[str], per_class: int = 2) -> Path:
    for f in folders:
        (root / f).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / f / f"{i}.jpg")
    return root


def test_wnid_lists_are_consistent() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    for name in ("imagenet-a", "imagenet-r"):
        classes = variant_classes(name)
        assert len(classes) == 200 and set(classes.folders) <= set(wnids)
        assert list(classes.source_indices) == sorted(classes.source_indices)


def test_subset_labels_map_to_imagenet_classes() -> None:
    a, r = variant_classes("imagenet-a"), variant_classes("imagenet-r")
    assert (a.folders[0], a.names[0], a.source_indices[0]) == ("n01498041", "stingray", 6)
    assert (r.folders[0], r.names[0], r.source_indices[0]) == ("n01443537", "goldfish", 1)
    assert variant_classes("imagenet-sketch").folders[0] == "n01440764"


def test_imagenet_a_reads_against_the_200_class_space(tmp_path: Path, caplog) -> None:
    root = _tree(tmp_path, ["n01498041", "n12267677", "n99999999"])  # first and last A classes, one stranger
    data = read_variant("imagenet-a", root)
    assert len(data) == 4 and sorted(set(data.targets)) == [0, 199]
    image, label = data[0]
    assert label == 0 and image.size == (8, 8)
    assert "198 of 200 class folders missing" in caplog.text and "outside the label space" in caplog.text


def test_imagenet_v2_folders_are_class_indices_not_strings(tmp_path: Path) -> None:
    root = _tree(tmp_path, ["0", "1", "10", "2", "100"], per_class=1)
    data = read_variant("imagenet-v2", root)
    assert sorted(data.targets) == [0, 1, 2, 10, 100]
    assert {p.parent.name: y for p, y in data.samples} == {"0": 0, "1": 1, "2": 2, "10": 10, "100": 100}


def test_folder_without_images_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "n01498041").mkdir()
    with pytest.raises(DataError, match="no image files"):
        read_variant("imagenet-a", tmp_path)
    with pytest.raises(ConfigError, match="unknown ImageNet variant"):
        read_variant("imagenet-b", tmp_path)


def test_class_files_world_cub_and_wnid_lists(tmp_path: Path) -> None:
    world = {"classes": ["red_square", "blue_circle"], "names": ["red square", "blue circle"],
             "templates": ["a sketch of a {}."]}  # fmt: skip
    (tmp_path / "classes.json").write_text(json.dumps(world))
    w = read_class_file(tmp_path / "classes.json")
    assert w.folders == ("red_square", "blue_circle") and w.prompts()[0] == "a sketch of a red square."
    (tmp_path / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    cub = read_class_file(tmp_path / "classes.txt")
    assert cub.names == ("Black footed Albatross", "Laysan Albatross")
    assert cub.folders[0] == "001.Black_footed_Albatross"
    (tmp_path / "wnids.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    assert read_class_file(tmp_path / "wnids.txt").folders == ("n01440764", "n01443537")


def test_load_class_names_by_name_folder_or_file(tmp_path: Path) -> None:
    assert len(load_class_names("cifar100")) == len(CIFAR100_CLASSES) == 100
    assert load_class_names("imagenet-r") == variant_classes("imagenet-r")
    _tree(tmp_path / "tree", ["b_cls", "a_cls"], per_class=1)
    assert load_class_names("", tmp_path / "tree").names == ("a cls", "b cls")
    with pytest.raises(ConfigError, match="not one of"):
        load_class_names("nope.json", tmp_path)


def test_templates_and_the_underscore_quirk() -> None:
    assert len(imagenet_templates()) == 80 and all(t.count("{}") == 1 for t in imagenet_templates())
    assert underscore_template("a photo of a {}.") == "a_photo_of_a {}."
    assert underscore_template("{} in the wild") == "{} in the wild"
    with pytest.raises(ConfigError):
        ClassNames(("a",), templates=("no slot",))


def test_classification_folder_keeps_labels_of_a_fixed_space(tmp_path: Path) -> None:
    _tree(tmp_path, ["b"], per_class=1)
    data = ClassificationFolder(tmp_path, ClassNames(("a", "b", "c")))
    assert data.targets == [1]
