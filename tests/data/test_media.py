"""Tests for image loading, the bad-sample report and the skipping collate."""

import logging

import pytest
import torch
from PIL import Image

from vlprompt.data import BadSamples, collate_skip_none, load_image
from vlprompt.errors import DataError


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (4, 3), 128).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (4, 3)


def test_load_image_missing_and_corrupt_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="bad.png"):
        load_image(bad)


def test_load_image_truncated_file_fails_at_load(tmp_path):
    path = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        load_image(path)


def test_bad_samples_counts_and_examples(caplog):
    bad = BadSamples(max_examples=2)
    with caplog.at_level(logging.WARNING, logger="vlprompt.data"):
        for i in range(4):
            bad.add(f"f{i}.jpg", "missing" if i % 2 else "unreadable")
    assert bad.total == 4 and bad.counts == {"unreadable": 2, "missing": 2}
    assert [name for name, _ in bad.examples] == ["f0.jpg", "f1.jpg"]
    assert "f0.jpg" in bad.summary() and "4" in bad.summary()
    assert bad.as_dict()["total"] == 4
    # Only the examples are logged one by one, plus one line saying the rest are only counted.
    assert len(caplog.records) == 3
    assert not BadSamples()


def test_collate_skip_none():
    batch = [(torch.zeros(2), 0), None, (torch.ones(2), 1)]
    images, labels = collate_skip_none(batch)
    assert images.shape == (2, 2) and labels.tolist() == [0, 1]
    assert collate_skip_none([None, None]) is None
