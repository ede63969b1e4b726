"""VizWiz-Captions conversion: filtering, both record shapes, and the Karpathy reader reading the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.data import load_gallery, read_annotations
from vlprompt.data.vizwiz import main, read_vizwiz
from vlprompt.errors import DataError


@pytest.fixture
def vizwiz(tmp_path: Path) -> Path:
    (tmp_path / "val").mkdir()
    images = [{"file_name": f"VizWiz_val_{i:08d}.jpg", "id": 100 + i} for i in range(3)]
    for img in images:
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / img["file_name"], format="JPEG")
    anns = []
    for i in range(3):
        for k in range(5):
            anns.append({"id": len(anns), "image_id": 100 + i, "caption": f"object {i} view {k}",
                         "is_rejected": i == 1 and k == 0, "is_precanned": i == 2 and k < 2})  # fmt: skip
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def test_train_style_drops_rejected_and_precanned(vizwiz: Path) -> None:
    records = read_vizwiz(vizwiz, "val")
    assert len(records) == 15 - 1 - 2
    assert records[0] == {"image": "val/VizWiz_val_00000000.jpg", "caption": "object 0 view 0", "image_id": "100"}
    assert len(read_vizwiz(vizwiz, "val", drop_rejected=False, drop_precanned=False)) == 15


def test_test_style_keeps_images_with_enough_captions(vizwiz: Path, tmp_path: Path) -> None:
    records = read_vizwiz(vizwiz, "val", style="test", min_captions=5)
    assert [r["image"] for r in records] == ["val/VizWiz_val_00000000.jpg"]  # the others lost captions
    assert len(read_vizwiz(vizwiz, "val", style="test", limit=2)) == 2
    out = tmp_path / "test.json"
    assert main([str(vizwiz), str(out), "--style", "test", "--image-dir", "val"]) == 0
    gallery = load_gallery(out, tmp_path)
    assert gallery.num_images == 3 and len(gallery.captions) == 12
    assert read_annotations(out)[1]["caption"][0] == "object 1 view 1"


def test_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([{"image": "a"}]))
    with pytest.raises(DataError, match="not a VizWiz-Captions file"):
        read_vizwiz(bad)
