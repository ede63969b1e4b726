"""Tests for the ImageFolder-style classification reader."""

import pytest
from PIL import Image
from torchvision.transforms import ToTensor

from vlprompt.data import ImageFolderDataset
from vlprompt.errors import DataError


@pytest.fixture
def root(tmp_path):
    files = {"zebra": ["1.png", "2.JPG"], "ant": ["a.jpeg", "b.webp", "notes.txt"], "cat": ["c.bmp"]}
    formats = Image.registered_extensions()
    for cls, names in files.items():
        (tmp_path / cls).mkdir()
        for name in names:
            path = tmp_path / cls / name
            if name.endswith(".txt"):
                path.write_text("ignored")
            else:
                Image.new("RGB", (5, 4), (1, 2, 3)).save(path, format=formats[path.suffix.lower()])
    return tmp_path


def test_sorted_classes_and_extensions(root):
    ds = ImageFolderDataset(root, ToTensor())
    assert ds.classes == ["ant", "cat", "zebra"]
    assert ds.targets == [0, 0, 1, 2, 2]
    image, label = ds[4]
    assert image.shape == (3, 4, 5) and label == 2


def test_explicit_class_order_and_subset(root):
    ds = ImageFolderDataset(root, ToTensor(), classes=["zebra", "ant"])
    assert ds.classes == ["zebra", "ant"] and ds.targets == [0, 0, 1, 1]
    with pytest.raises(DataError, match="dog"):
        ImageFolderDataset(root, ToTensor(), classes=["ant", "dog"])


def test_corrupt_file_skipped_or_strict(root):
    (root / "cat" / "c.bmp").write_bytes(b"garbage")
    ds = ImageFolderDataset(root, ToTensor())
    assert ds[2] is None and ds.bad_samples.counts == {"unreadable": 1}
    with pytest.raises(DataError, match="c.bmp"):
        ImageFolderDataset(root, ToTensor(), strict=True)[2]


def test_broken_link_counted_as_missing(root):
    (root / "cat" / "gone.png").symlink_to(root / "nowhere.png")
    ds = ImageFolderDataset(root, ToTensor())
    assert len(ds) == 5 and ds.bad_samples.counts == {"missing": 1}


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "nope", ToTensor())
