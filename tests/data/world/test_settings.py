"""Per-super-category scene settings: the parts the shipped CLIPs were trained on are untouched, the continual
scenes carry their super-category's context, and that context differs between super-categories."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlprompt.data.world import layout as L
from vlprompt.data.world import plan_world
from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.render import BACKGROUND, render_objects, render_scene
from vlprompt.data.world.scenes import sample_scene
from vlprompt.data.world.settings import (
    OFF_SETTING,
    SETTINGS,
    Backdrop,
    paint_backdrop,
    scene_setting,
    setting_for,
)

# Recorded from the world of format version 1 (before settings and the grounding part existed), size small,
# seed 0: sha256 over (path, sha256 of decoded pixels or of the JSON bytes) of the files listed. The shipped
# CLIPs were pretrained on the base part; the other parts feed the other demo rows and must not move either.
BASE_DIGEST = (62, "124c77679078b449194c4f9e93ed261aea13ce95ca8c58162307fc6a8d0860b6")
UNTOUCHED_DIGEST = (1162, "880c862c09c0a78fd3046a2695e38f2c70a27e7fa84baef31d3aa963d92ad1c2")
# Everything but the continual and grounding parts, the videos (their bytes depend on the FFmpeg build; video.py
# is untouched) and the two descriptive files.
CHANGED = re.compile(r"^(continual/|grounding/|video/|README\.md$|world\.json$|images/[^/]+/(cl|gr|grb)_)")


def _digest(root: Path, keep) -> tuple[int, str]:
    files = json.loads(L.manifest_file(root).read_text())["files"]
    h, n = hashlib.sha256(), 0
    for rel in sorted(files):
        if not keep(rel):
            continue
        path = root / rel
        data = np.asarray(Image.open(path).convert("RGB")).tobytes() if rel.endswith(".png") else path.read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        n += 1
    return n, h.hexdigest()


def test_base_part_and_other_parts_are_unchanged(small_world: Path) -> None:
    base = {r["image"] for split in ("train", "val") for r in json.loads(L.base_retrieval_file(small_world, split)
                                                                          .read_text())}  # fmt: skip
    assert _digest(small_world, lambda rel: rel in base or rel.startswith("retrieval/base_")) == BASE_DIGEST
    assert _digest(small_world, lambda rel: not CHANGED.match(rel)) == UNTOUCHED_DIGEST


def test_only_continual_and_grounding_scenes_have_backdrops() -> None:
    plan = plan_world(seed=0, size="small")
    for rel, _, _, _, backdrop in plan.images:
        name = Path(rel).name
        if name.startswith(("cl_", "gr_")):
            assert backdrop is not None, rel
        else:
            assert backdrop is None, rel  # base (retrieval and grounding), adaptation, classification
    continual = [(rel, b) for rel, _, _, _, b in plan.images if Path(rel).name.startswith("cl_")]
    own = sum(b.setting == setting_for(int(Path(rel).name.split("_")[2])).name for rel, b in continual)
    assert own >= 0.6 * len(continual)


def test_backdrops_are_deterministic_and_vary_by_seed() -> None:
    for s in SETTINGS:
        a, b = paint_backdrop(Backdrop(s.name, 7)), paint_backdrop(Backdrop(s.name, 7))
        assert a.shape == (256, 256, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
        assert not np.array_equal(a, paint_backdrop(Backdrop(s.name, 8)))
    with pytest.raises(ValueError, match="unknown setting"):
        paint_backdrop(Backdrop("moon", 0))


def test_mean_background_colour_differs_per_super_category() -> None:
    means = np.array([
        np.mean([render_objects((), "clean", 0, Backdrop(s.name, i)).reshape(-1, 3).mean(0) for i in range(12)], 0)
        for s in SETTINGS
    ])  # fmt: skip
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(SETTINGS), 1)]
    assert gaps.min() > 30  # RGB levels; the closest pair (sky, tiled wall) is ~58 apart
    # and the backdrop really is what render_scene paints behind the objects
    scene = sample_scene(random.Random(0), categories=["star"], setting=setting_for(3))
    corner = render_scene(scene)[0, 0]
    assert not np.array_equal(corner, BACKGROUND) and np.array_equal(
        corner, render_objects((), "clean", 0, scene.backdrop)[0, 0]
    )


def test_layout_follows_the_setting() -> None:
    def mean_y(setting_index: int) -> float:
        rng, ys = random.Random(1), []
        for _ in range(300):
            scene = sample_scene(rng, setting=SETTINGS[setting_index])
            ys += [o.y for o in scene.objects]
        return float(np.mean(ys))

    sky, meadow = mean_y(0), mean_y(1)
    assert SETTINGS[0].name == "sky" and SETTINGS[1].name == "meadow"
    # objects high in the sky, low on the grass (canvas centre 32 px; about 27.6 and 35.8 with 300 scenes each,
    # above/below pairs span the whole height in every setting)
    assert sky < 30 < 34 < meadow


def test_off_setting_rate() -> None:
    rng = random.Random(0)
    draws = [scene_setting(rng, 4).supercategory for _ in range(2000)]
    off = sum(d != 4 for d in draws) / len(draws)
    assert abs(off - OFF_SETTING) < 0.04
    assert set(draws) == set(range(1, len(V.SUPERCATEGORIES) + 1))
