"""Where everything lives in a built world, so no other code hard-codes these paths.

All image paths inside annotation files are relative to the world root (the root is the ``image_root``).
"""

from __future__ import annotations

import os
from pathlib import Path

DOMAINS: tuple[str, ...] = ("clean", "sketch", "noisy", "blurred", "low_contrast", "textured")
SHIFTED_DOMAINS: tuple[str, ...] = DOMAINS[1:]
SPLITS: tuple[str, ...] = ("train", "val", "test")

MANIFEST = "manifest.json"
WORLD_META = "world.json"
README = "README.md"
MANIFEST_FORMAT = "vlprompt-world"

VIDEO_FRAMES = 12
VIDEO_FPS = 1  # one frame per second, so CLIP4Clip-style 1 fps sampling sees every frame
VIDEO_SPLITS = {"train": "train", "val": "validate", "test": "test"}  # our split -> MSR-VTT's word

PathLike = str | os.PathLike


def image_relpath(domain: str, name: str) -> str:
    """Relative path of a static scene image, as written in annotation files."""
    return f"images/{domain}/{name}.png"


def base_retrieval_file(root: PathLike, split: str) -> Path:
    """retrieval/base_{train,val}.json: the clean, held-out-free pretraining part."""
    if split not in ("train", "val"):
        raise ValueError(f"the base part has train and val splits, not {split!r}")
    return Path(root) / "retrieval" / f"base_{split}.json"


def retrieval_file(root: PathLike, split: str, domain: str | None = None) -> Path:
    """Adaptation retrieval annotations.

    ``train``/``val`` without a domain: retrieval/{train,val}.json (clean); with a domain:
    retrieval/{train,val}_<domain>.json. ``test`` always has a domain (default clean): retrieval/test_<domain>.json.
    ``base_train``/``base_val`` are accepted as shorthands for :func:`base_retrieval_file`.
    """
    if split.startswith("base_"):
        return base_retrieval_file(root, split[5:])
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split == "test":
        domain = domain or "clean"
    name = split if domain is None else f"{split}_{domain}"
    return Path(root) / "retrieval" / f"{name}.json"


def continual_file(root: PathLike, split: str) -> Path:
    """continual/{train,val,test}.json: ALBEF records with an integer super-category ``category``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root) / "continual" / f"{split}.json"


def continual_tasks_file(root: PathLike) -> Path:
    """continual/tasks.json: {"order": [category ids], "names": {id: name}}."""
    return Path(root) / "continual" / "tasks.json"


def classification_root(root: PathLike, domain: str, split: str) -> Path:
    """An ImageFolder tree: classification/<domain>/<split>/<class_dir>/<name>.png.

    Train and val exist for ``clean`` only; test exists for every domain (the same scenes in each).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root) / "classification" / domain / split


def classes_file(root: PathLike) -> Path:
    """classification/classes.json: class dirs, names, coarse labels and prompt templates."""
    return Path(root) / "classification" / "classes.json"


def cil_tasks_file(root: PathLike) -> Path:
    """classification/cil_tasks.json: the 10-task class-incremental split."""
    return Path(root) / "classification" / "cil_tasks.json"


def video_root(root: PathLike) -> Path:
    """The text-video part's root (CLIP4Clip MSR-VTT layout)."""
    return Path(root) / "video"


def video_dir(root: PathLike) -> Path:
    """Folder of the mp4 files."""
    return video_root(root) / "videos"


def video_file(root: PathLike, video_id: str) -> Path:
    """video/videos/<video_id>.mp4."""
    return video_dir(root) / f"{video_id}.mp4"


def video_data_json(root: PathLike) -> Path:
    """video/MSRVTT_data.json: {"videos": [...], "sentences": [...]}."""
    return video_root(root) / "MSRVTT_data.json"


def video_train_csv(root: PathLike) -> Path:
    """video/MSRVTT_train.9k.csv: header ``video_id``."""
    return video_root(root) / "MSRVTT_train.9k.csv"


def video_test_csv(root: PathLike) -> Path:
    """video/MSRVTT_JSFUSION_test.csv: ``key,vid_key,video_id,sentence``, one caption per video."""
    return video_root(root) / "MSRVTT_JSFUSION_test.csv"


def video_val_csv(root: PathLike) -> Path:
    """video/val.csv: same format as the test csv."""
    return video_root(root) / "val.csv"


def reversed_pairs_file(root: PathLike) -> Path:
    """video/reversed_pairs.json: a list of [video_id, video_id] test pairs that are time reversals."""
    return video_root(root) / "reversed_pairs.json"


GROUNDING_DATASET = "world"  # MDETR's dataset_name, and the <dataset> of the file names


def grounding_file(root: PathLike, split: str, domain: str = "clean") -> Path:
    """MDETR ``finetune_<dataset>_<split>.json`` files of the grounding part, under grounding/.

    ``train``/``val``/``test`` (clean, the continual sequence): ``finetune_world_<split>.json``; ``test`` in a
    shifted domain: ``finetune_world-<domain>_test.json``; ``base_train``/``base_val`` (the plain-background
    pretraining part): ``finetune_world-base_{train,val}.json``.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split in ("base_train", "base_val"):
        if domain != "clean":
            raise ValueError("the grounding base part is clean only")
        return Path(root) / "grounding" / f"finetune_{GROUNDING_DATASET}-base_{split[5:]}.json"
    if split not in SPLITS:
        raise ValueError(f"unknown grounding split {split!r}; expected base_train, base_val or one of {SPLITS}")
    if domain != "clean" and split != "test":
        raise ValueError(f"shifted domains have a grounding test split only, not {split!r}")
    dataset = GROUNDING_DATASET if domain == "clean" else f"{GROUNDING_DATASET}-{domain}"
    return Path(root) / "grounding" / f"finetune_{dataset}_{split}.json"


def grounding_files(root: PathLike) -> dict[str, Path]:
    """Every grounding file by key: base_train, base_val, train, val, test and test_<domain> per shifted domain."""
    out = {k: grounding_file(root, k) for k in ("base_train", "base_val", "train", "val", "test")}
    out.update({f"test_{d}": grounding_file(root, "test", d) for d in SHIFTED_DOMAINS})
    return out


def manifest_file(root: PathLike) -> Path:
    """manifest.json: format, version, seed, size and the sha256 of every other file."""
    return Path(root) / MANIFEST


def world_meta_file(root: PathLike) -> Path:
    """world.json: vocabulary, held-out compositions, counts."""
    return Path(root) / WORLD_META
