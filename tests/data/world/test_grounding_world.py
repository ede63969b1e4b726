"""The world's grounding part: MDETR files the real reader reads, unique expressions, renderer boxes."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from vlprompt.data.continual import read_tasks_file
from vlprompt.data.grounding import build_task_lists, mdetr_file_split, read_mdetr_refexp
from vlprompt.data.world import layout as L
from vlprompt.data.world import plan_world
from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.refexp import (
    EXTREME_WORDS,
    Description,
    Expression,
    expression_text,
    resolve,
    sample_grounding_scene,
)
from vlprompt.data.world.render import BACKGROUND, object_box, render_objects
from vlprompt.data.world.scenes import ObjectSpec, all_colours
from vlprompt.data.world.settings import setting_for
from vlprompt.errors import DataError


@pytest.fixture(scope="module")
def plan():
    return plan_world(seed=0, size="small")


@pytest.fixture(scope="module")
def scenes(plan) -> dict[str, tuple]:
    """relpath -> (objects, domain, render seed, backdrop)."""
    return {rel: rest for rel, *rest in plan.images}


def _docs(plan) -> dict[str, dict]:
    return {rel: json.loads(data) for rel, data in plan.texts.items() if rel.startswith("grounding/")}


# ------------------------------------------------------------------------------------------- a test-side parser

_NOUNS = {w: c.name for c in V.CATEGORIES for w in c.singular}
_SIZES = {w: k for k, ws in V.SIZE_WORDS.items() for w in ws}
_FILLS = {w: k for k, ws in V.FILL_WORDS.items() for w in ws}
_RELS = {w: k for k, ws in V.RELATION_WORDS.items() for w in ws}


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_NP = rf"(?:({_alt(_SIZES)}) )?(?:({_alt(_FILLS)}) )?(?:({_alt(V.COLOUR_NAMES)}) )?({_alt(_NOUNS)})"


def _description(groups: tuple) -> Description:
    size, fill, colour, noun = groups
    return Description(_NOUNS[noun], colour, _SIZES.get(size), _FILLS.get(fill))


def parse(text: str) -> Expression:
    """The expression a text says, read back with the vocabulary alone (independent of the generator)."""
    for direction, templates in EXTREME_WORDS.items():
        for t in templates:
            m = re.fullmatch(re.escape(t).replace(r"\{\}", _NP), text)
            if m:
                return Expression(_description(m.groups()), extreme=direction)
    m = re.fullmatch(rf"the {_NP} ({_alt(_RELS)}) the {_NP}", text)
    if m:
        g = m.groups()
        return Expression(_description(g[:4]), relation=_RELS[g[4]], landmark=_description(g[5:]))
    m = re.fullmatch(rf"the {_NP}", text)
    assert m, f"cannot parse {text!r}"
    return Expression(_description(m.groups()))


# ---------------------------------------------------------------------------------------------------- the files


def test_files_and_reader_round_trip(small_world: Path, plan) -> None:
    tasks = read_tasks_file(L.continual_tasks_file(small_world))
    files = L.grounding_files(small_world)
    assert set(files) == {"base_train", "base_val", "train", "val", "test"} | {f"test_{d}" for d in L.SHIFTED_DOMAINS}
    clean_test = None
    for key, path in files.items():
        raw = json.loads(path.read_text())
        samples = read_mdetr_refexp(path, image_root=small_world, tasks=tasks)
        assert len(samples) == len(raw["images"]) == len(raw["annotations"]) > 0
        dataset, split = mdetr_file_split(path)
        assert {s.dataset for s in samples} == {dataset} and {s.split for s in samples} == {split}
        for s, img, ann in zip(samples, raw["images"], raw["annotations"]):
            assert Path(s.image).is_file() and (s.width, s.height) == (64, 64)
            assert s.expression == img["caption"] and list(s.bbox) == ann["bbox"]
            assert s.category_id == V.CATEGORY_INDEX[V.CATEGORIES[s.category_id - 1].name] + 1
            sc = V.CATEGORIES[s.category_id - 1].supercategory
            assert s.supercategory == V.SUPERCATEGORIES[sc - 1] and (s.supercategory_id, s.task) == (sc, sc - 1)
            start, end = ann["tokens_positive"][0]
            noun = s.expression[start:end]
            assert noun.split()[-1] in " ".join(V.CATEGORIES[s.category_id - 1].singular).split()
        if key != "base_train" and key != "base_val":  # one super-category (and its task) per scene
            by_scene: dict[int, set] = {}
            for s in samples:
                by_scene.setdefault(s.image_id, set()).add(s.task)
            assert all(len(t) == 1 for t in by_scene.values())
        doc = build_task_lists(samples, tasks=tasks)
        assert [len(t["ids"]) for t in doc["tasks"]] == [sum(s.task == t for s in samples) for t in range(6)]
        if key == "test":
            clean_test = samples
    for d in L.SHIFTED_DOMAINS:  # same scenes and expressions, other pixels
        shifted = read_mdetr_refexp(files[f"test_{d}"], tasks=tasks)
        assert [(s.expression, s.bbox, s.image_id) for s in shifted] == [
            (s.expression, s.bbox, s.image_id) for s in clean_test]  # fmt: skip
        assert all(s.image.startswith(f"images/{d}/") for s in shifted)
    train = read_mdetr_refexp(files["train"], tasks=tasks)
    assert {s.task for s in train} == set(range(6))


def test_reader_needs_the_worlds_task_sequence(small_world: Path) -> None:
    path = L.grounding_file(small_world, "train")
    with pytest.raises(DataError, match="super-category 'polygons'"):
        read_mdetr_refexp(path)  # LPI's COCO tasks by default
    samples = read_mdetr_refexp(path, tasks=read_tasks_file(L.continual_tasks_file(small_world)))
    with pytest.raises(DataError, match="another task sequence"):
        build_task_lists(samples)


def test_expressions_pick_out_exactly_their_target(plan, scenes) -> None:
    n, forms = 0, {"plain": 0, "extreme": 0, "relation": 0}
    for doc in _docs(plan).values():
        for img, ann in zip(doc["images"], doc["annotations"]):
            objects = scenes[img["file_name"]][0]
            target = ann["original_id"] % 10
            expr = parse(img["caption"])
            assert resolve(expr, objects) == [target], img["caption"]
            assert V.CATEGORY_INDEX[objects[target].category] + 1 == ann["category_id"]
            forms["extreme" if expr.extreme else "relation" if expr.relation else "plain"] += 1
            n += 1
    assert n > 100 and all(v > 5 for v in forms.values()), forms


def test_boxes_are_inside_and_match_the_rendered_object(plan, scenes) -> None:
    for doc in _docs(plan).values():
        for img, ann in zip(doc["images"], doc["annotations"]):
            objects, domain, seed, backdrop = scenes[img["file_name"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 3 and h > 3
            assert ann["area"] == pytest.approx(w * h)
            if domain != "clean":
                continue
            # the pixels the target changes in its own scene lie in its box (1 px of antialiasing around it) ...
            obj = objects[ann["original_id"] % 10]
            full = render_objects(objects, domain, seed, backdrop).astype(int)
            without = render_objects([o for o in objects if o is not obj], domain, seed, backdrop).astype(int)
            ys, xs = np.nonzero(np.abs(full - without).sum(-1) > 30)
            assert len(ys) > 0
            assert x - 1 <= xs.min() and xs.max() + 1 <= x + w + 1 and y - 1 <= ys.min() and ys.max() + 1 <= y + h + 1
            # ... and the box is tight: drawn alone, the object reaches every side of it
            alone = np.abs(render_objects([obj]).astype(int) - BACKGROUND.astype(int)).sum(-1) > 30
            ys, xs = np.nonzero(alone)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == pytest.approx((x, y, x + w, y + h), abs=1.0)


def test_grounding_scenes_are_deterministic_and_well_formed(plan) -> None:
    again = plan_world(seed=0, size="small")
    assert _docs(again) == _docs(plan)
    assert _docs(plan_world(seed=1, size="small")) != _docs(plan)
    rng = random.Random(0)
    polygons = [c.name for c in V.CATEGORIES if c.supercategory == 1]
    for _ in range(200):
        scene = sample_grounding_scene(rng, polygons, all_colours, setting_for(1))
        objs = scene.objects
        assert 2 <= len(objs) <= 4 and scene.backdrop is not None and scene.backdrop.setting == "sky"
        assert {o.category for o in objs} <= set(polygons)
        for a, b in ((a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]):  # nominal boxes never overlap
            assert abs(a.x - b.x) >= (a.extent + b.extent) / 2 or abs(a.y - b.y) >= (a.extent + b.extent) / 2


def test_base_part_is_plain_and_has_no_held_out_pairs(plan, scenes) -> None:
    docs = _docs(plan)
    for key in ("base_train", "base_val"):
        doc = docs[L.grounding_file(".", key).as_posix().removeprefix("./")]
        for img in doc["images"]:
            objects, domain, _, backdrop = scenes[img["file_name"]]
            assert domain == "clean" and backdrop is None
            assert not {(o.category, o.colour) for o in objects} & V.HELD_OUT_BASE


# ----------------------------------------------------------------------------------------- resolve on made scenes


def _obj(cat: str, colour: str, x: float, y: float, size: str = "small", fill: str = "solid") -> ObjectSpec:
    return ObjectSpec(cat, colour, size, fill, x, y, 12.0 if size == "small" else 18.0)


def test_resolve_semantics_on_hand_made_scenes() -> None:
    two_red_stars = [_obj("star", "red", 15, 30), _obj("star", "red", 45, 30), _obj("circle", "blue", 30, 52)]
    red_star = Description("star", "red")
    assert resolve(Expression(red_star), two_red_stars) == [0, 1]  # ambiguous
    assert resolve(Expression(red_star, extreme="left"), two_red_stars) == [0]
    assert resolve(Expression(red_star, extreme="right"), two_red_stars) == [1]
    assert resolve(Expression(red_star, extreme="top"), two_red_stars) == []  # same height: no clear topmost
    assert resolve(Expression(Description("circle")), two_red_stars) == [2]
    assert resolve(Expression(red_star, relation="above", landmark=Description("circle")), two_red_stars) == [0, 1]
    assert resolve(Expression(Description("circle"), relation="below", landmark=Description("star", "red")),
                   two_red_stars) == []  # the landmark itself is ambiguous  # fmt: skip
    assert resolve(Expression(Description("star"), relation="left of", landmark=Description("circle")),
                   two_red_stars) == [0]  # fmt: skip
    # "left of" needs the boxes apart: overlapping in x is neither left nor right
    close = [_obj("star", "red", 20, 15), _obj("circle", "blue", 28, 45)]
    assert resolve(Expression(Description("star"), relation="left of", landmark=Description("circle")), close) == []
    assert resolve(Expression(Description("star"), relation="above", landmark=Description("circle")), close) == [0]
    sizes = [_obj("square", "green", 15, 30, "small"), _obj("square", "green", 45, 30, "large", "striped")]
    assert resolve(Expression(Description("square", size="large")), sizes) == [1]
    assert resolve(Expression(Description("square", fill="solid")), sizes) == [0]
    with pytest.raises(ValueError):
        Expression(red_star, extreme="left", relation="left of", landmark=Description("circle"))


def test_expression_text_and_span() -> None:
    rng = random.Random(0)
    e = Expression(Description("star", "red", "small"), relation="left of", landmark=Description("circle", "blue"))
    for _ in range(20):
        text, (start, end) = expression_text(e, rng)
        assert parse(text) == e
        assert text[start:end].endswith("star") and text.startswith("the ") and "blue" in text[end:]


def test_layout_helpers_for_grounding() -> None:
    assert L.grounding_file("/w", "train").as_posix() == "/w/grounding/finetune_world_train.json"
    assert L.grounding_file("/w", "base_val").as_posix() == "/w/grounding/finetune_world-base_val.json"
    path = L.grounding_file("/w", "test", "low_contrast")
    assert path.name == "finetune_world-low_contrast_test.json"
    assert mdetr_file_split(path) == ("world-low_contrast", "test")
    with pytest.raises(ValueError):
        L.grounding_file("/w", "train", "sketch")
    with pytest.raises(ValueError):
        L.grounding_file("/w", "base_train", "noisy")
    assert object_box(_obj("square", "red", 32, 32, "large"))[2] > object_box(_obj("square", "red", 32, 32))[2]


def test_the_shipped_tiny_clip_knows_every_word_of_the_expressions(plan) -> None:
    import vlprompt
    from vlprompt.backbone.embedded import known_token_rows

    backbone = vlprompt.load_backbone("vlprompt-tiny", pretrained="world")
    known = known_token_rows(backbone.model)
    words = {w for doc in _docs(plan).values() for img in doc["images"] for w in img["caption"].split()}
    words |= {w for t in EXTREME_WORDS.values() for form in t for w in form.split() if w != "{}"}
    tokens = backbone.tokenize(sorted(words)).cpu()
    unknown = [w for w, row in zip(sorted(words), tokens) if not all(bool(known[t]) for t in row[row > 0])]
    assert unknown == []
