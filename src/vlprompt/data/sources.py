"""One entry point from a ``data`` config section to training pairs and evaluation galleries, for images or videos.

Image-text formats yield ``(image, caption, index)`` pairs and ``(image, index)`` gallery items; video formats
yield ``(frames, mask, caption, index)`` and ``(frames, mask, index)``. Everything else (the trainer, the
evaluator) only looks at that shape. :func:`classification_set` gives a classification test set (an ImageNet
variant or a class-folder tree), as test-time adaptation reads it.

:func:`split_files` is the one rule for where a split's files are (every command goes through it): a relative
``data.<split>`` path resolves against ``data.root`` (the working directory when it is empty); relative image
paths inside a Karpathy file resolve against ``data.root`` when set, else against the folder the annotation file
implies (its own, or the nearest one above it that holds its images). With ``data.root`` set, a split whose
images also exist as different files where the annotation file is, is refused (``data.images_from`` chooses).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlprompt.data.classnames import VARIANTS, load_class_names
from vlprompt.data.imagenet import ClassificationFolder, read_variant
from vlprompt.data.karpathy import (
    GalleryImages,
    ImageTextPairs,
    RecordFilter,
    RetrievalGallery,
    implied_image_root,
    load_gallery,
)
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


def data_path(data: Any, value: str) -> Path:
    """A path a ``data`` section names: absolute as written, relative under ``data.root`` (or the working folder)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or not data.root else Path(data.root).expanduser() / path


@dataclass(frozen=True)
class SplitFiles:
    """Where one Karpathy split's files are: its annotation file and the root of its relative image paths."""

    annotation: Path
    images: Path
    check_ambiguity: bool  # also look where the annotation file is, and refuse different files there

    def pairs(self, transform: Any, strict: bool = False, filter: RecordFilter | None = None) -> ImageTextPairs:
        """Training pairs of this split."""
        return ImageTextPairs(self.annotation, self.images, transform, strict, filter, self.check_ambiguity)

    def gallery(self, strict: bool = False, filter: RecordFilter | None = None) -> RetrievalGallery:
        """This split grouped by image (an evaluation gallery)."""
        return load_gallery(self.annotation, self.images, strict, filter, self.check_ambiguity)


def split_files(data: Any, split: str) -> SplitFiles:
    """The annotation file of ``data.<split>`` and the folder its relative image paths resolve against.

    ``data.images_from``: ``auto`` = ``data.root`` when set (checked against the folder the annotation file
    implies), else that folder; ``root`` = ``data.root``, unchecked; ``annotation`` = the folder the annotation
    file implies (:func:`~vlprompt.data.karpathy.implied_image_root`), whatever ``data.root`` says.
    """
    value = getattr(data, split)
    if not value:
        raise ConfigError(f"data.{split} is empty: no annotation file to read")
    annotation = data_path(data, value)
    how = getattr(data, "images_from", "auto")
    if how == "root" and not data.root:
        raise ConfigError("data.images_from=root needs data.root (the folder the image paths are relative to)")
    if data.root and how != "annotation":
        return SplitFiles(annotation, Path(data.root).expanduser(), check_ambiguity=how == "auto")
    return SplitFiles(annotation, implied_image_root(annotation), check_ambiguity=False)


def data_locations(data: Any) -> dict[str, Any]:
    """Absolute locations of every split that ``data`` names (what a run directory records in ``env.json``):
    Karpathy splits give their annotation file and image root, video splits their file and video folder, folder
    formats (classification) the folder. A split that cannot be resolved records the reason instead."""
    out: dict[str, Any] = {"root": str(Path(data.root).expanduser().resolve())} if data.root else {}
    for split in ("train", "val", "test"):
        value = getattr(data, split)
        if not value:
            continue
        try:
            if data.format == "karpathy":
                files = split_files(data, split)
                out[split] = {"annotation": str(files.annotation.resolve()), "images": str(files.images.resolve())}
            elif is_video_format(data.format):
                out[split] = {"annotation": value, "videos": str(_video_root(data).resolve())}
            else:
                out[split] = {"images": str(data_path(data, value).resolve())}
        except (ConfigError, DataError) as err:  # the reader reports it when the run reads the split
            out[split] = {"error": str(err)}
    return out


def _video_root(data: Any) -> Path:
    return data_path(data, data.video_root) if data.video_root else Path(data.root) / "videos"


def _video_split(data: Any, split: str, value: str):
    kwargs = {} if value == DEFAULT_SPLIT_FILE else {_override_key(data.format): value}
    reader_split = {"val": "val", "test": "test", "train": "train"}[split]
    return read_video_split(data.format, data.root, _video_root(data), reader_split, **kwargs)


def _override_key(fmt: str) -> str:
    # which keyword each reader takes for a non-default split file
    return {"msrvtt": "csv_name", "lsmdc": "csv_name", "vatex": "list_name", "msvd": "list_name"}.get(fmt, "csv_name")


def _order_pairs(data: Any, video_ids: list[str]) -> list[tuple[int, int]] | None:
    """Index pairs from ``data.order_pairs`` (a JSON list of [video_id, video_id]) that are both in the gallery."""
    if not data.order_pairs:
        return None
    path = data_path(data, data.order_pairs)
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
    return split_files(data, "train").pairs(spec.image_train, strict=data.strict)


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
    gallery = split_files(data, split).gallery(strict=data.strict)
    images = GalleryImages(gallery, spec.image_eval, strict=data.strict)
    return EvalSet(images, gallery.captions, gallery.txt2img, gallery.num_images, ("t2i", "i2t"), images.bad_samples)


def classification_set(data: Any, classes: str = "") -> ClassificationFolder:
    """The test images of ``data`` (an ImageNet variant, or an ImageFolder tree named by ``classes``, e.g. the
    ``tta.classes`` key: a class-name spec of :func:`~vlprompt.data.classnames.load_class_names`)."""
    if not data.root:
        raise ConfigError("data.root is empty: give the folder of the test images")
    folder = data_path(data, data.test) if data.test else Path(data.root).expanduser()  # the rule of every split
    if data.format in VARIANTS:
        return read_variant(data.format, folder, strict=data.strict)
    if data.format != "imagefolder":
        known = ", ".join(["imagefolder", *VARIANTS, "karpathy (rlcf_retrieval)"])
        raise ConfigError(f"data.format {data.format!r} is not a TTA classification format; use one of: {known}")
    names = load_class_names(classes, data.root if classes else folder)
    return ClassificationFolder(folder, names, strict=data.strict)
