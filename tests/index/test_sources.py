"""`--data` of `vlprompt index build` resolves images by the rule of every command (data.sources.split_files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.data.sources import VisualSpec, eval_set
from vlprompt.errors import DataError
from vlprompt.index.sources import resolve_data


def test_an_annotation_file_finds_its_images_as_every_command_does(tmp_path: Path) -> None:
    for folder in ("colour", "mono", "world/images"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "e1.png")
    for folder, image in (("colour", "e1.png"), ("mono", "e1.png"), ("world/retrieval", "images/e1.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "test.json").write_text(json.dumps([{"image": image, "caption": ["x"]}]))
    mono = resolve_data(str(tmp_path / "mono" / "test.json"), {})
    assert mono.data.root == str(tmp_path / "mono") and mono.described["images"] == str(tmp_path / "mono")
    world = resolve_data(str(tmp_path / "world" / "retrieval" / "test.json"), {})
    assert world.data.root == str(tmp_path / "world")  # the nearest folder above that holds the images
    # --root is data.root: then the file's own folder is checked against it (here: two different e1.png)
    forced = resolve_data(str(tmp_path / "mono" / "test.json"), {}, root=str(tmp_path / "colour"))
    assert forced.data.root == str(tmp_path / "colour")
    with pytest.raises(DataError, match="images_from"):
        eval_set(forced.data, "test", VisualSpec(None, None, 4, (0,) * 3, (1,) * 3))
