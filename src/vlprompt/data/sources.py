"""One entry point from a ``data`` config section to training pairs and evaluation galleries, for images or videos.

Image-text formats yield ``(image, caption, index)`` pairs and ``(image, index)`` gallery items; video formats
yield ``(frames, mask, caption, index)`` and ``(frames, mask, index)``. Everything else (the trainer, the
evaluator) only looks at that shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlprompt.data.karpathy import GalleryImages, ImageTextPairs, load_gallery
from vlprompt.data.media import BadSamples
from vlprompt.data.video import VideoTransform
from vlprompt.data.video_datasets import VIDEO_READERS, GalleryVideos, VideoTextPairs, read_video_split
from vlprompt.errors import ConfigError, DataError

#: The value of data.train/val/test that asks a video format for its standard file of that split.
DEFAULT_SPLIT_FILE = "default"


@dataclass
class EvalSet:
    """A retrieval gallery: visual items, the captions that query it and which item each caption describes."""

    dataset: Dataset
    captions: list[str]
    txt2vis: list[int]
    num_visual: int
    names: tuple[str, str]  # metric prefixes: text->visual, visual->text
    bad_samples: BadSamples
    order_pairs: list[tuple[int, int]] | None = None  # visual items that are time reversals of each other


@dataclass
class VisualSpec:
    """What the data layer needs to know about the model's input (no model import here)."""

    image_train: Callable[[Any], Any]
    image_eval: Callable[[Any], Any]
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]


def is_video_format(fmt: str) -> bool:
    """True for text-video formats (MSR-VTT, VATEX, ...)."""
    return fmt in VIDEO_READERS


def _path(data: Any, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or not data.root else Path(data.root) / path


def _video_split(data: Any, split: str, value: str):
    kwargs = {} if value == DEFAULT_SPLIT_FILE else {_override_key(data.format): value}
    video_root = _path(data, data.video_root) if data.video_root else Path(data.root) / "videos"
    reader_split = {"val": "val", "test": "test", "train": "train"}[split]
    return read_video_split(data.format, data.root, video_root, reader_split, **kwargs)


def _override_key(fmt: str) -> str:
    # which keyword each reader takes for a non-default split file
    return {"msrvtt": "csv_name", "lsmdc": "csv_name", "vatex": "list_name", "msvd": "list_name"}.get(fmt, "csv_name")


def _order_pairs(data: Any, video_ids: list[str]) -> list[tuple[int, int]] | None:
    """Index pairs from ``data.order_pairs`` (a JSON list of [video_id, video_id]) that are both in the gallery."""
    if not data.order_pairs:
        return None
    path = _path(data, data.order_pairs)
    try:
        raw = json.loads(path.read_text())
        index = {v: i for i, v in enumerate(video_ids)}
        return [(index[a], index[b]) for a, b in raw if a in index and b in index]
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"cannot read order pairs {path}: {err}") from err


def train_set(data: Any, spec: VisualSpec, seed: int = 0) -> Dataset:
    """Training pairs of ``data.train``."""
    if not data.train:
        raise ConfigError("data.train is empty: give an annotation file to train on")
    if is_video_format(data.format):
        transform = VideoTransform(spec.image_size, spec.mean, spec.std)
        split = _video_split(data, "train", data.train)
        return VideoTextPairs(split, data.num_frames, transform, mode="random", strict=data.strict, seed=seed)
    if data.format != "karpathy":
        raise ConfigError(f"data.format {data.format!r} is not a retrieval format; use karpathy or a video format")
    return ImageTextPairs(_path(data, data.train), data.root, spec.image_train, strict=data.strict)


def eval_set(data: Any, split: str, spec: VisualSpec) -> EvalSet | None:
    """The gallery of ``data.<split>`` (None when that entry is empty)."""
    value = getattr(data, split)
    if not value:
        return None
    if is_video_format(data.format):
        transform = VideoTransform(spec.image_size, spec.mean, spec.std)
        videos = GalleryVideos(_video_split(data, split, value), data.num_frames, transform, strict=data.strict)
        s = videos.split
        pairs = _order_pairs(data, s.video_ids) if split == "test" else None
        return EvalSet(videos, s.captions, s.txt2vid, s.num_videos, ("t2v", "v2t"), videos.bad_samples, pairs)
    gallery = load_gallery(_path(data, value), data.root, strict=data.strict)
    images = GalleryImages(gallery, spec.image_eval, strict=data.strict)
    return EvalSet(images, gallery.captions, gallery.txt2img, gallery.num_images, ("t2i", "i2t"), images.bad_samples)
