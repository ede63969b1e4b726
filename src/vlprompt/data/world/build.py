"""Build the embedded world: sample every spec, render images and videos (optionally in parallel), write the
annotation files in the real formats, a README, world.json and, last, a manifest with checksums.

Every item is seeded from (seed, part, split, index), never from a shared stream, so the bytes do not depend
on the number of workers or on the order in which they finish. The world is built in a temporary sibling
folder and moved into place at the end, so an interrupted build never leaves a half-written world behind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.data.world import layout as L
from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.grounding_part import GroundingSize, plan_grounding
from vlprompt.data.world.scenes import (
    ObjectSpec,
    SceneSpec,
    base_colours,
    captions_for,
    sample_class_scene,
    sample_scene,
)
from vlprompt.data.world.settings import OFF_SETTING, SETTINGS, Backdrop, scene_setting
from vlprompt.data.world.video import VideoSpec, captions_for_video, reverse_video, sample_video
from vlprompt.errors import DataError


@dataclass(frozen=True)
class WorldSize:
    """How many items each part gets (classification counts are per class, continual ones per task)."""

    base_train: int
    base_val: int
    ret_train: int
    ret_val: int
    ret_test: int
    ret_shift_train: int  # the first N adaptation train scenes, rendered in every shifted domain
    cl_train: int
    cl_val: int
    cl_test: int
    cls_train: int
    cls_val: int
    cls_test: int
    vid_train: int
    vid_val_pairs: int
    vid_test_pairs: int
    grounding: GroundingSize


WORLD_SIZES = {
    "small": WorldSize(40, 20, 20, 20, 20, 10, 4, 2, 3, 1, 1, 1, 8, 2, 4, GroundingSize(12, 4, 2, 1, 1)),
    "default": WorldSize(
        5000, 300, 1000, 200, 300, 300, 150, 25, 50, 30, 3, 5, 360, 30, 80, GroundingSize(1000, 100, 100, 15, 30)
    ),
}
CAPTIONS_PER_ITEM = 5
HELD_OUT_FRACTION = 0.5  # adaptation scenes whose first object is a held-out category-colour pair


def item_seed(seed: int, *keys: Any) -> int:
    """A 64-bit seed for one item, from the world seed and the item's keys (stable across processes)."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _rng(seed: int, *keys: Any) -> random.Random:
    return random.Random(item_seed(seed, *keys))


def _json_bytes(obj: Any, sort_keys: bool = False) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=sort_keys) + "\n").encode("utf-8")


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


@dataclass
class _Plan:
    seed: int
    # (relpath, objects, domain, render seed, backdrop or None for the plain background)
    images: list[tuple[str, tuple[ObjectSpec, ...], str, int, Backdrop | None]] = field(default_factory=list)
    videos: list[tuple[str, VideoSpec, bool]] = field(default_factory=list)
    texts: dict[str, bytes] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)

    def image(self, relpath: str, scene: SceneSpec, domain: str) -> str:
        self.images.append((relpath, scene.objects, domain, item_seed(self.seed, "render", relpath), scene.backdrop))
        return relpath


# ------------------------------------------------------------------------------------------------------ parts


def _pairs(rel: str, name: str, caps: list[str], **extra: Any) -> list[dict]:
    return [{"image": rel, "caption": c, "image_id": name, **extra} for c in caps]


def _plan_retrieval(p: _Plan, sz: WorldSize) -> None:
    seed = p.seed
    for split, n in (("train", sz.base_train), ("val", sz.base_val)):
        recs: list[dict] = []
        for i in range(n):
            name, rng = f"base_{split}_{i:05d}", _rng(seed, "base", split, i)
            scene = sample_scene(rng, colours_for=base_colours)
            caps = captions_for(scene, rng, CAPTIONS_PER_ITEM)
            rel = p.image(L.image_relpath("clean", name), scene, "clean")
            recs += _pairs(rel, name, caps) if split == "train" else [{"image": rel, "caption": caps}]
        p.texts[_rel(L.base_retrieval_file(".", split))] = _json_bytes(recs)
    p.counts["base"] = {"train_images": sz.base_train, "val_images": sz.base_val}

    held_out = sorted(V.HELD_OUT_BASE)
    scenes: dict[str, list[tuple[str, SceneSpec, list[str]]]] = {}
    for split, n in (("train", sz.ret_train), ("val", sz.ret_val), ("test", sz.ret_test)):
        scenes[split] = []
        for i in range(n):
            rng = _rng(seed, "ret", split, i)
            first = rng.choice(held_out) if rng.random() < HELD_OUT_FRACTION else None
            scene = sample_scene(rng, first=first)
            scenes[split].append((f"ret_{split}_{i:05d}", scene, captions_for(scene, rng, CAPTIONS_PER_ITEM)))

    def write(key: str, items: list, domain: str, pairs: bool, draw: bool = True) -> None:
        recs: list[dict] = []
        for name, scene, caps in items:
            rel = L.image_relpath(domain, name)
            if draw:
                p.image(rel, scene, domain)
            recs += _pairs(rel, name, caps) if pairs else [{"image": rel, "caption": caps}]
        p.texts[key] = _json_bytes(recs)

    write(_rel(L.retrieval_file(".", "train")), scenes["train"], "clean", True)
    write(_rel(L.retrieval_file(".", "val")), scenes["val"], "clean", False)
    for d in L.DOMAINS:
        write(_rel(L.retrieval_file(".", "test", d)), scenes["test"], d, False)
        # Clean train/val images were drawn for train.json/val.json already.
        write(_rel(L.retrieval_file(".", "train", d)), scenes["train"][: sz.ret_shift_train], d, True, d != "clean")
        write(_rel(L.retrieval_file(".", "val", d)), scenes["val"], d, False, d != "clean")
    p.counts["retrieval"] = {
        "train_images": sz.ret_train,
        "val_images": sz.ret_val,
        "test_images_per_domain": sz.ret_test,
        "shift_train_images_per_domain": min(sz.ret_shift_train, sz.ret_train),
        "held_out_fraction_forced": HELD_OUT_FRACTION,
    }


def _plan_continual(p: _Plan, sz: WorldSize) -> None:
    order = list(range(1, len(V.SUPERCATEGORIES) + 1))
    for split, n in (("train", sz.cl_train), ("val", sz.cl_val), ("test", sz.cl_test)):
        recs: list[dict] = []
        for task in order:
            cats = [c.name for c in V.CATEGORIES if c.supercategory == task]
            for i in range(n):
                name, rng = f"cl_{split}_{task}_{i:04d}", _rng(p.seed, "cl", split, task, i)
                scene = sample_scene(rng, categories=cats, setting=scene_setting(rng, task))
                caps = captions_for(scene, rng, CAPTIONS_PER_ITEM)
                rel = p.image(L.image_relpath("clean", name), scene, "clean")
                if split == "train":
                    recs += _pairs(rel, name, caps, category=task)
                else:
                    recs.append({"image": rel, "caption": caps, "category": task})
        p.texts[_rel(L.continual_file(".", split))] = _json_bytes(recs)
    names = {str(i): n for i, n in enumerate(V.SUPERCATEGORIES, start=1)}
    p.texts[_rel(L.continual_tasks_file("."))] = _json_bytes({"order": order, "names": names})
    p.counts["continual"] = {"tasks": len(order), "train_per_task": sz.cl_train, "val_per_task": sz.cl_val,
                             "test_per_task": sz.cl_test}  # fmt: skip


def class_list() -> list[tuple[str, str, int, str, str]]:
    """Fine classes in canonical order: (dir name, human name, coarse index, category, colour)."""
    out = []
    for ci, cat in enumerate(V.CATEGORIES):
        for col in V.CLASS_COLOURS:
            out.append((f"{col}_{cat.name.replace(' ', '_')}", f"{col} {cat.name}", ci, cat.name, col))
    return out


def _plan_classification(p: _Plan, sz: WorldSize) -> None:
    classes = class_list()
    for split, n, domains in (("train", sz.cls_train, ("clean",)), ("val", sz.cls_val, ("clean",)),
                              ("test", sz.cls_test, L.DOMAINS)):  # fmt: skip
        for k, (dirname, _, _, cat, col) in enumerate(classes):
            for i in range(n):
                name, rng = f"cls_{split}_{k:03d}_{i:03d}", _rng(p.seed, "cls", split, k, i)
                scene = sample_class_scene(rng, cat, col)
                for d in domains:
                    p.image(f"classification/{d}/{split}/{dirname}/{name}.png", scene, d)
    p.texts[_rel(L.classes_file("."))] = _json_bytes({
        "classes": [c[0] for c in classes],
        "names": [c[1] for c in classes],
        "coarse": [c[2] for c in classes],
        "coarse_names": [c.name for c in V.CATEGORIES],
        "templates": list(V.CLASS_TEMPLATES),
    })  # fmt: skip
    order = list(range(len(classes)))
    _rng(p.seed, "cil").shuffle(order)
    num_tasks = 10
    bounds = [round(t * len(order) / num_tasks) for t in range(num_tasks + 1)]
    tasks = [order[bounds[t] : bounds[t + 1]] for t in range(num_tasks)]
    p.texts[_rel(L.cil_tasks_file("."))] = _json_bytes({"num_tasks": num_tasks, "class_order": order, "tasks": tasks})
    p.counts["classification"] = {"classes": len(classes), "coarse_classes": len(V.CATEGORIES), "cil_tasks": num_tasks,
                                  "train_per_class": sz.cls_train, "val_per_class": sz.cls_val,
                                  "test_per_class_per_domain": sz.cls_test}  # fmt: skip


def _plan_video(p: _Plan, sz: WorldSize) -> None:
    entries: list[tuple[str, str, list[str]]] = []  # (video_id, msrvtt split, captions)
    pairs: dict[str, list[list[str]]] = {"train": [], "val": [], "test": []}

    def add(split: str, spec: VideoSpec, reverse: bool, rng: random.Random) -> str:
        vid = f"video{len(entries)}"
        caps = captions_for_video(reverse_video(spec) if reverse else spec, rng, CAPTIONS_PER_ITEM)
        entries.append((vid, L.VIDEO_SPLITS[split], caps))
        p.videos.append((_rel(L.video_file(".", vid)), spec, reverse))
        return vid

    i = 0
    while sum(e[1] == "train" for e in entries) < sz.vid_train:
        rng = _rng(p.seed, "video", "train", i)
        spec = sample_video(rng)
        a = add("train", spec, False, rng)
        if rng.random() < 0.5 and sum(e[1] == "train" for e in entries) < sz.vid_train:
            pairs["train"].append([a, add("train", spec, True, rng)])
        i += 1
    for split, n in (("val", sz.vid_val_pairs), ("test", sz.vid_test_pairs)):
        for i in range(n):
            rng = _rng(p.seed, "video", split, i)
            spec = sample_video(rng)
            a = add(split, spec, False, rng)
            pairs[split].append([a, add(split, spec, True, rng)])

    sentences, sen_id = [], 0
    for vid, _, caps in entries:
        for c in caps:
            sentences.append({"caption": c, "video_id": vid, "sen_id": sen_id})
            sen_id += 1
    data = {"videos": [{"video_id": vid, "split": split} for vid, split, _ in entries], "sentences": sentences}
    p.texts[_rel(L.video_data_json("."))] = _json_bytes(data)
    p.texts[_rel(L.video_train_csv("."))] = _csv_bytes(["video_id"], [[v] for v, s, _ in entries if s == "train"])
    for split, path in (("test", L.video_test_csv(".")), ("validate", L.video_val_csv("."))):
        rows = [[f"ret{j}", f"msr{vid[5:]}", vid, caps[0]] for j, (vid, _, caps) in
                enumerate(e for e in entries if e[1] == split)]  # fmt: skip
        p.texts[_rel(path)] = _csv_bytes(["key", "vid_key", "video_id", "sentence"], rows)
    p.texts[_rel(L.reversed_pairs_file("."))] = _json_bytes(pairs["test"])
    p.counts["video"] = {
        "frames": L.VIDEO_FRAMES, "fps": L.VIDEO_FPS,
        "train": sum(e[1] == "train" for e in entries), "val": 2 * sz.vid_val_pairs, "test": 2 * sz.vid_test_pairs,
        "train_reversed_pairs": len(pairs["train"]), "val_reversed_pairs": len(pairs["val"]),
    }  # fmt: skip


def _plan_grounding(p: _Plan, sz: WorldSize) -> None:
    docs, counts = plan_grounding(lambda *keys: _rng(p.seed, *keys), p.image, sz.grounding)
    p.texts.update({rel: _json_bytes(doc) for rel, doc in docs.items()})
    p.counts["grounding"] = counts


def _rel(path: Path) -> str:
    return Path(path).as_posix().removeprefix("./")


# --------------------------------------------------------------------------------------------------- rendering


def _render_chunk(job: tuple[str, list, list]) -> list[tuple[str, str]]:
    """Render and write one chunk of images and videos; returns (relpath, sha256) for each file."""
    from PIL import Image

    from vlprompt.data.world.render import render_objects
    from vlprompt.data.world.video import render_video, write_mp4

    root, images, videos = Path(job[0]), job[1], job[2]
    out = []
    for relpath, objects, domain, seed, backdrop in images:
        buf = io.BytesIO()
        Image.fromarray(render_objects(objects, domain, seed, backdrop)).save(buf, format="PNG")
        data = buf.getvalue()
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out.append((relpath, hashlib.sha256(data).hexdigest()))
    for relpath, spec, reverse in videos:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, render_video(spec, reverse))
        out.append((relpath, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


def _render_all(root: Path, p: _Plan, workers: int) -> dict[str, str]:
    chunks = [(str(root), p.images[i : i + 250], []) for i in range(0, len(p.images), 250)]
    chunks += [(str(root), [], p.videos[i : i + 24]) for i in range(0, len(p.videos), 24)]
    chunks.sort(key=lambda c: -len(c[2]))  # slow video chunks first, so both workers finish together
    shas: dict[str, str] = {}
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            shas.update(_render_chunk(c))
        return shas
    # fork is cheap and needs no re-import; the children only use NumPy, Pillow and PyAV.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(min(workers, len(chunks))) as pool:
        for res in pool.imap_unordered(_render_chunk, chunks):
            shas.update(res)
    return shas


# ---------------------------------------------------------------------------------------------------- the build


def _readme(seed: int, size: str, counts: dict) -> str:
    settings = "; ".join(f"{V.SUPERCATEGORIES[s.supercategory - 1]}: {s.name}" for s in SETTINGS)
    off = OFF_SETTING
    held = ", ".join(f"{col} {cat}" for cat, col in sorted(V.HELD_OUT_BASE, key=lambda t: V.CATEGORY_INDEX[t[0]]))
    cats = "; ".join(
        f"{i} {sc}: " + ", ".join(c.name for c in V.CATEGORIES if c.supercategory == i)
        for i, sc in enumerate(V.SUPERCATEGORIES, start=1)
    )
    return f"""# vlprompt embedded world (format version {V.WORLD_VERSION}, seed {seed}, size {size})

Generated by `vlprompt world build --seed {seed} --size {size}`. Deterministic: the same seed and version give
the same bytes (with the same NumPy, Pillow, zlib and FFmpeg builds); `manifest.json` lists the sha256 of
every other file. All image paths in annotation files are relative to this folder.

## Content
- Categories (super-category id, name: categories): {cats}.
- Colours: {", ".join(V.COLOUR_NAMES)}; sizes: small, large; fills: {", ".join(V.FILLS)}
  (letters, digits and symbols are always solid: their strokes are too thin to show a fill, so their captions
  name no fill).
- Scenes: a single object at a 3x3 grid position, a group of 2-3 identical objects, or a pair of objects in a
  spatial relation (left of / right of / above / below). {CAPTIONS_PER_ITEM} captions per image; every caption
  names the colour and category of every object; size, fill and position appear in most.
- Domains: {", ".join(L.DOMAINS)} (the same scene specs rendered in each style).

## Parts
- `retrieval/base_train.json`, `retrieval/base_val.json`: the base (pretraining) part; clean domain, static
  images, and no object with a held-out category-colour pair. Held out of base: {held}.
- `retrieval/train.json`, `val.json` (clean), `test_<domain>.json`, `train_<domain>.json`, `val_<domain>.json`:
  the adaptation part (disjoint scenes from base; in {HELD_OUT_FRACTION:.0%} of scenes the first object is a
  held-out pair). `train_<domain>.json` renders the first adaptation train scenes in that domain; test scenes
  are never used for training in any domain.
- `continual/{{train,val,test}}.json`: scenes whose objects all come from one super-category; each record has
  an integer `category` (1-6); `continual/tasks.json` gives the task order. Each super-category has its own
  setting (backdrop, context objects, layout: {settings}); {off:.0%} of scenes use another one's.
- `grounding/finetune_world*_{{train,val,test}}.json`: referring expressions in MDETR's `finetune_refcoco` format
  (one image entry per expression, its target box, categories with the super-category names of
  `continual/tasks.json`). `finetune_world-base_{{train,val}}.json`: plain background, every super-category, no
  held-out pair; `finetune_world_{{train,val,test}}.json`: 2-4 objects of one super-category in its setting;
  `finetune_world-<domain>_test.json`: the same test scenes in each shifted domain. Every expression is checked
  to pick out exactly its target (attributes, the one furthest in a direction, or a relation to a unique landmark).
- `classification/<domain>/<split>/<class>/*.png`: ImageFolder trees; 96 fine classes (category x
  {"/".join(V.CLASS_COLOURS)}), train/val clean only, test in every domain (same scenes);
  `classes.json` (class dirs, names, coarse 24-category label, prompt templates) and `cil_tasks.json`
  (10 class-incremental tasks in a seeded class order).
- `video/`: CLIP4Clip MSR-VTT layout; {L.VIDEO_FRAMES} frames of 64x64 per video at {L.VIDEO_FPS} fps (MPEG-4 Part 2
  in mp4).
  Every val/test event also appears time-reversed as its own video with its own caption;
  `reversed_pairs.json` lists the test pairs.

## Counts
```
{json.dumps(counts, indent=1)}
```
"""


def _meta(seed: int, size: str, counts: dict) -> dict:
    return {
        "format": L.MANIFEST_FORMAT,
        "version": V.WORLD_VERSION,
        "seed": seed,
        "size": size,
        "domains": list(L.DOMAINS),
        "supercategories": {str(i): n for i, n in enumerate(V.SUPERCATEGORIES, start=1)},
        "categories": [{"name": c.name, "supercategory": c.supercategory, "glyph": c.glyph} for c in V.CATEGORIES],
        "colours": V.COLOURS,
        "sizes": list(V.SIZES),
        "fills": list(V.FILLS),
        "held_out_base": [[cat, col] for cat, col in sorted(V.HELD_OUT_BASE)],
        "settings": {str(s.supercategory): s.name for s in SETTINGS},
        "image_size": 64,
        "counts": counts,
    }


def plan_world(seed: int = 0, size: str = "default") -> _Plan:
    """Sample every spec and annotation of the world without rendering anything."""
    if size not in WORLD_SIZES:
        raise DataError(f"unknown world size {size!r}; expected one of {', '.join(WORLD_SIZES)}")
    sz = WORLD_SIZES[size]
    p = _Plan(seed)
    _plan_retrieval(p, sz)
    _plan_continual(p, sz)
    _plan_classification(p, sz)
    _plan_video(p, sz)
    _plan_grounding(p, sz)
    p.texts[L.README] = _readme(seed, size, p.counts).encode("utf-8")
    p.texts[L.WORLD_META] = _json_bytes(_meta(seed, size, p.counts))
    return p


def _is_world(path: Path) -> bool:
    try:
        return json.loads(L.manifest_file(path).read_text()).get("format") == L.MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_world(out: str | os.PathLike, seed: int = 0, size: str = "default", workers: int = 1) -> dict:
    """Build the world into ``out`` (replacing a previous world there); returns a summary."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_world(out))):
        raise DataError(f"{out} exists and is not an embedded world; refusing to overwrite it")
    plan = plan_world(seed, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shas = _render_all(tmp, plan, workers)
        for rel, data in plan.texts.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            shas[rel] = hashlib.sha256(data).hexdigest()
        manifest = {"format": L.MANIFEST_FORMAT, "version": V.WORLD_VERSION, "seed": seed, "size": size,
                    "files": dict(sorted(shas.items()))}  # fmt: skip
        L.manifest_file(tmp).write_bytes(_json_bytes(manifest, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "seed": seed,
        "size": size,
        "version": V.WORLD_VERSION,
        "workers": workers,
        "files": len(shas) + 1,
        "images": len(plan.images),
        "videos": len(plan.videos),
        "counts": plan.counts,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def verify_world(root: str | os.PathLike) -> list[str]:
    """Problems with a built world (missing files, checksum mismatches); empty when it matches its manifest."""
    root = Path(root)
    try:
        manifest = json.loads(L.manifest_file(root).read_text())
    except (OSError, ValueError) as e:
        return [f"cannot read {L.manifest_file(root)}: {e}"]
    problems = []
    for rel, sha in manifest.get("files", {}).items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            problems.append(f"checksum mismatch: {rel}")
    return problems
