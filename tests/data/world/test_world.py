"""The embedded world: determinism, file formats, truthful captions, domains, videos, class and task splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlprompt.data.world import (
    DOMAINS,
    build_world,
    caption_for,
    plan_world,
    reverse_video,
    sample_video,
    verify_world,
)
from vlprompt.data.world import layout as L
from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.scenes import category_words
from vlprompt.data.world.video import caption_for_video
from vlprompt.errors import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    build_world(out, seed=0, size="small", workers=1)
    return out


@pytest.fixture(scope="module")
def plan():
    return plan_world(seed=0, size="small")


@pytest.fixture(scope="module")
def objects_of(plan) -> dict[str, tuple]:
    """relpath -> the objects drawn in that image."""
    return {rel: objs for rel, objs, *_ in plan.images}


def _load(path: Path):
    return json.loads(path.read_text())


def _manifest(root: Path) -> dict:
    return _load(L.manifest_file(root))


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_with_any_worker_count(world: Path, tmp_path: Path) -> None:
    other = tmp_path / "w2"
    build_world(other, seed=0, size="small", workers=2)
    assert _manifest(other) == _manifest(world)
    assert verify_world(other) == [] and verify_world(world) == []  # so every file is byte-identical too


def test_different_seed_gives_a_different_world(world: Path, tmp_path: Path) -> None:
    other = tmp_path / "w3"
    build_world(other, seed=1, size="small", workers=1)
    a, b = _manifest(world)["files"], _manifest(other)["files"]
    assert a.keys() == b.keys()
    changed = [k for k in a if a[k] != b[k]]
    assert len(changed) > 0.9 * len(a)


def test_cli_builds_the_same_world(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlprompt.cli.main import main

    out = tmp_path / "cli"
    assert main(["world", "build", "--out", str(out), "--size", "small", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "images" in printed and "grounding:" in printed
    assert _manifest(out) == _manifest(world)
    # building again over a world replaces it in place
    assert main(["world", "build", "--out", str(out), "--size", "small", "--seed", "3", "--workers", "1"]) == 0
    assert _manifest(out)["seed"] == 3 and verify_world(out) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataError):
        build_world(tmp_path, size="small")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_manifest_lists_exactly_the_files(world: Path) -> None:
    m = _manifest(world)
    assert (m["format"], m["version"], m["seed"], m["size"]) == ("vlprompt-world", V.WORLD_VERSION, 0, "small")
    on_disk = {p.relative_to(world).as_posix() for p in world.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(m["files"])
    assert list(m["files"]) == sorted(m["files"])
    assert (world / "README.md").is_file() and (world / "world.json").is_file()


# -------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_file_formats(world: Path) -> None:
    for split in ("train", "val"):
        for f in (L.base_retrieval_file(world, split), L.retrieval_file(world, split)):
            recs = _load(f)
            assert recs
            for r in recs:
                assert (world / r["image"]).is_file()
                if split == "train":
                    assert set(r) == {"image", "caption", "image_id"} and isinstance(r["caption"], str)
                else:
                    assert set(r) == {"image", "caption"} and len(r["caption"]) == 5
                    assert len(set(r["caption"])) == 5
    train = _load(L.retrieval_file(world, "train"))
    by_image: dict[str, int] = {}
    for r in train:
        by_image[r["image_id"]] = by_image.get(r["image_id"], 0) + 1
    assert set(by_image.values()) == {5}
    assert all(r["image"].startswith("images/clean/") for r in train)


def test_splits_are_disjoint_and_base_has_no_held_out_pairs(world: Path, objects_of: dict) -> None:
    def images(path: Path) -> set[str]:
        return {Path(r["image"]).name for r in _load(path)}

    base = images(L.base_retrieval_file(world, "train")) | images(L.base_retrieval_file(world, "val"))
    train, val = images(L.retrieval_file(world, "train")), images(L.retrieval_file(world, "val"))
    test = images(L.retrieval_file(world, "test"))
    assert not (base & train) and not (base & val) and not (base & test)
    assert not (train & val) and not (train & test) and not (val & test)
    for split in ("train", "val"):
        for r in _load(L.base_retrieval_file(world, split)):
            assert not {(o.category, o.colour) for o in objects_of[r["image"]]} & V.HELD_OUT_BASE
    held = [r for r in _load(L.retrieval_file(world, "train"))
            if {(o.category, o.colour) for o in objects_of[r["image"]]} & V.HELD_OUT_BASE]  # fmt: skip
    assert held, "the adaptation split must contain held-out compositions"


def test_every_domain_renders_the_same_test_scenes(world: Path, objects_of: dict) -> None:
    clean = _load(L.retrieval_file(world, "test", "clean"))
    ref = np.asarray(Image.open(world / clean[0]["image"]))
    for d in DOMAINS:
        recs = _load(L.retrieval_file(world, "test", d))
        assert [r["caption"] for r in recs] == [r["caption"] for r in clean]
        assert [Path(r["image"]).name for r in recs] == [Path(r["image"]).name for r in clean]
        for r, c in zip(recs, clean):
            assert r["image"] == L.image_relpath(d, Path(c["image"]).stem)
            assert objects_of[r["image"]] == objects_of[c["image"]]
        img = Image.open(world / recs[0]["image"])
        assert img.size == (64, 64) and img.mode == "RGB"
        if d != "clean":
            assert not np.array_equal(np.asarray(img), ref)
        # shifted-domain train/val files exist and never reuse test scenes
        for split in ("train", "val"):
            names = {Path(r["image"]).name for r in _load(L.retrieval_file(world, split, d))}
            assert names and not names & {Path(r["image"]).name for r in clean}


def test_captions_name_the_true_attributes(world: Path, objects_of: dict) -> None:
    files = [L.base_retrieval_file(world, "train"), L.retrieval_file(world, "test"), L.continual_file(world, "test")]
    n = 0
    for f in files:
        for r in _load(f):
            caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            for cap in caps:
                words = f" {cap} "
                for obj in objects_of[r["image"]]:
                    assert f" {obj.colour} " in words, (cap, obj)
                    assert any(f" {w} " in words or f" {w}," in words for w in category_words(obj.category)), cap
                n += 1
    assert n > 100


def test_canonical_caption_has_every_attribute(plan) -> None:
    from vlprompt.data.world.scenes import SceneSpec

    for _, objs, *_ in plan.images[:50]:
        if len(objs) != 1:
            continue
        o = objs[0]
        cap = caption_for(SceneSpec("single", objs, position="center"))
        assert o.colour in cap and o.size in cap and "in the center" in cap
        if V.CATEGORIES[V.CATEGORY_INDEX[o.category]].has_fill:
            assert V.FILL_WORDS[o.fill][0] in cap


# ----------------------------------------------------------------------------------------------------- video


def _frames(path: Path) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_video_annotations_and_reversed_pairs(world: Path) -> None:
    data = _load(L.video_data_json(world))
    splits = {v["video_id"]: v["split"] for v in data["videos"]}
    assert set(splits.values()) == {"train", "validate", "test"}
    caps: dict[str, list[str]] = {}
    for s in data["sentences"]:
        assert set(s) == {"caption", "video_id", "sen_id"}
        caps.setdefault(s["video_id"], []).append(s["caption"])
    assert all(len(caps[v]) == 5 for v in splits)
    assert [s["sen_id"] for s in data["sentences"]] == list(range(len(data["sentences"])))

    with open(L.video_train_csv(world), newline="") as f:
        train_ids = [r["video_id"] for r in csv.DictReader(f)]
    assert train_ids == [v for v, s in splits.items() if s == "train"]
    with open(L.video_test_csv(world), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["key", "vid_key", "video_id", "sentence"]
    test_ids = [r["video_id"] for r in rows]
    assert test_ids == [v for v, s in splits.items() if s == "test"]
    sentence = {r["video_id"]: r["sentence"] for r in rows}
    with open(L.video_val_csv(world), newline="") as f:
        assert [r["video_id"] for r in csv.DictReader(f)] == [v for v, s in splits.items() if s == "validate"]

    pairs = _load(L.reversed_pairs_file(world))
    assert pairs and {v for p in pairs for v in p} <= set(test_ids)
    for a, b in pairs:
        assert sentence[a] != sentence[b]
        fa, fb = _frames(L.video_file(world, a)), _frames(L.video_file(world, b))
        assert len(fa) == len(fb) == L.VIDEO_FRAMES
        assert all(f.shape == (64, 64, 3) for f in fa + fb)
        # the twin is the same frames backwards (up to codec noise), and not the same video forwards
        back = np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(fa, fb[::-1])])
        fwd = np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(fa, fb)])
        assert back < 1.5 < fwd
        assert np.abs(np.mean(fa, axis=0) - np.mean(fb, axis=0)).mean() < 1.5  # mean-pooling cannot tell them apart


def test_every_video_decodes(world: Path) -> None:
    for v in _load(L.video_data_json(world))["videos"]:
        frames = _frames(L.video_file(world, v["video_id"]))
        assert len(frames) == L.VIDEO_FRAMES and frames[0].shape == (64, 64, 3)


def test_reversal_inverts_captions() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        spec = sample_video(rng)
        rev = reverse_video(spec)
        back = reverse_video(rev)
        assert back.steps == spec.steps and back.obj.colour == spec.obj.colour and back.obj.size == spec.obj.size
        assert (back.obj.x, back.obj.y) == pytest.approx((spec.obj.x, spec.obj.y))
        assert caption_for_video(rev) != caption_for_video(spec)
        assert spec.obj.colour in caption_for_video(spec)


# ------------------------------------------------------------------------------------------ classification


def test_classification_classes_and_cil_tasks(world: Path) -> None:
    meta = _load(L.classes_file(world))
    classes = meta["classes"]
    assert 90 <= len(classes) <= 110 and len(set(classes)) == len(classes)
    assert len(meta["names"]) == len(meta["coarse"]) == len(classes)
    assert len(meta["coarse_names"]) == 24 and set(meta["coarse"]) == set(range(24))
    assert all("{}" in t for t in meta["templates"]) and meta["names"][0] == classes[0].replace("_", " ")
    cil = _load(L.cil_tasks_file(world))
    assert cil["num_tasks"] == 10 == len(cil["tasks"])
    flat = [c for t in cil["tasks"] for c in t]
    assert sorted(flat) == list(range(len(classes))) and flat == cil["class_order"]
    assert all(9 <= len(t) <= 11 for t in cil["tasks"])
    assert cil["class_order"] != sorted(cil["class_order"])

    trees = [L.classification_root(world, "clean", "train"), L.classification_root(world, "clean", "val")]
    trees += [L.classification_root(world, d, "test") for d in DOMAINS]
    for root in trees:
        assert sorted(p.name for p in root.iterdir()) == sorted(classes)
        assert all(any((root / c).glob("*.png")) for c in classes)
    names = [sorted(p.name for p in L.classification_root(world, d, "test").rglob("*.png")) for d in DOMAINS]
    assert all(n == names[0] for n in names)


# ------------------------------------------------------------------------------------------------- continual


def test_continual_tasks_follow_supercategories(world: Path, objects_of: dict) -> None:
    tasks = _load(L.continual_tasks_file(world))
    assert tasks["order"] == [1, 2, 3, 4, 5, 6]
    assert tasks["names"] == {str(i): n for i, n in enumerate(V.SUPERCATEGORIES, start=1)}
    for split in ("train", "val", "test"):
        recs = _load(L.continual_file(world, split))
        assert {r["category"] for r in recs} == set(tasks["order"])
        for r in recs:
            assert isinstance(r["category"], int)
            for o in objects_of[r["image"]]:
                assert V.CATEGORIES[V.CATEGORY_INDEX[o.category]].supercategory == r["category"]
        if split == "train":
            assert all(set(r) == {"image", "caption", "image_id", "category"} for r in recs)
        else:
            assert all(len(r["caption"]) == 5 for r in recs)


def test_layout_helpers() -> None:
    assert L.retrieval_file("/w", "test").as_posix() == "/w/retrieval/test_clean.json"
    assert L.retrieval_file("/w", "train").as_posix() == "/w/retrieval/train.json"
    assert L.retrieval_file("/w", "val", "sketch").as_posix() == "/w/retrieval/val_sketch.json"
    assert L.retrieval_file("/w", "base_train").as_posix() == "/w/retrieval/base_train.json"
    assert L.classification_root("/w", "noisy", "test").as_posix() == "/w/classification/noisy/test"
    with pytest.raises(ValueError):
        L.retrieval_file("/w", "test", "cartoon")
