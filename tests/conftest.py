"""Shared fixtures: a tiny generated image-text set and a micro CLIP, so no test downloads anything."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ["square", "circle", "triangle"]


def _draw(shape: str, colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    if shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "circle":
        d.ellipse(box, fill=colour)
    else:
        d.polygon([(size // 2, 5), (size - 5, size - 5), (5, size - 5)], fill=colour)
    return img


@pytest.fixture(scope="session")
def image_text_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images (colour x shape) in Karpathy format: train pairs, val and test with 2 captions each."""
    root = tmp_path_factory.mktemp("image_text")
    rng = random.Random(0)
    train, val = [], []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        name = f"images/{colour}_{shape}.png"
        (root / "images").mkdir(exist_ok=True)
        _draw(shape, COLOURS[colour]).save(root / name)
        caps = [f"a {colour} {shape}", f"a picture of a {colour} {shape}"]
        train += [{"image": name, "caption": c, "image_id": str(i)} for c in caps]
        val.append({"image": name, "caption": caps})
    rng.shuffle(train)
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))
    (root / "test.json").write_text(json.dumps(val))
    return root


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded world at its small size (a few seconds to build), shared by the whole session."""
    from vlprompt.data.world import build_world

    root = tmp_path_factory.mktemp("world") / "small"
    build_world(root, seed=0, size="small", workers=1)
    return root
