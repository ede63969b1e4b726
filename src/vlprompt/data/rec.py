"""Referring-expression samples as model inputs: which files a config names, and a dataset of detector inputs.

* :func:`read_rec_split` reads one split a config's ``data`` section names (``data.format`` ``mdetr-refexp``: the
  split's ``finetune_<dataset>_<split>.json`` file; ``refer``: the refer split name, e.g. ``testA``, of the folder
  ``grounding.dataset`` under ``data.root``) with the readers of :mod:`vlprompt.data.grounding`. Annotation paths
  follow :func:`~vlprompt.data.sources.data_path` (absolute, or relative to ``data.root``); the images' file names
  resolve against ``grounding.images`` (relative to ``data.root``), else ``data.root``.
* :class:`RecDataset` turns :class:`~vlprompt.data.grounding.RefSample` s into ``(image, expression, box, size,
  task, index)``: the image **squashed** to the detector's square input (OWL-ViT's preprocessing: resize both sides,
  no crop, no padding, so normalised box coordinates are those of the original image), the target box in pixels
  ``xyxy`` and the original ``(width, height)`` (the frame of the box, what
  :func:`vlprompt.methods.grounding.normalized_targets` and ``predict(sizes=...)`` take). The size is the annotation's,
  the frame its boxes are written in. As everywhere in ``data/``, a missing image is dropped when the dataset is
  built and an undecodable one comes back as ``None`` (:func:`~vlprompt.data.collate.collate_skip_none` drops it);
  ``strict=True`` makes either an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from vlprompt.data.continual import TaskSpec
from vlprompt.data.grounding import RefSample, mdetr_file_split, read_mdetr_refexp, read_refer
from vlprompt.data.media import BadSamples, Transform, drop_missing, load_or_skip
from vlprompt.data.sources import data_path
from vlprompt.errors import ConfigError, DataError

#: ``data.format`` values of referring-expression data.
REC_FORMATS = ("mdetr-refexp", "refer")


def image_root(data: Any, grounding: Any) -> Path | None:
    """Where the samples' image file names resolve: ``grounding.images`` (under ``data.root``), else ``data.root``."""
    if grounding.images:
        return data_path(data, grounding.images)
    return Path(data.root).expanduser() if data.root else None


def read_rec_split(data: Any, grounding: Any, split: str, tasks: Sequence[TaskSpec] | None = None) -> list[RefSample]:
    """The samples of ``data.<split>`` (see the module docstring); ``tasks``: the task sequence to read with."""
    value = getattr(data, split)
    if not value:
        raise ConfigError(f"data.{split} is empty: no referring-expression file to read")
    root = image_root(data, grounding)
    if data.format == "mdetr-refexp":
        path = data_path(data, value)
        samples = read_mdetr_refexp(path, root, None if mdetr_file_split(path) else split, tasks)
        if grounding.dataset:
            other = sorted({s.dataset for s in samples} - {grounding.dataset})
            if other:
                raise ConfigError(f"{path} holds dataset(s) {other}, not grounding.dataset={grounding.dataset!r}")
        return samples
    if data.format == "refer":
        if not grounding.dataset:
            raise ConfigError("data.format=refer needs grounding.dataset: the refer folder (refcoco, refcoco+, "
                              "refcocog) under data.root")  # fmt: skip
        folder = data_path(data, grounding.dataset)
        return read_refer(folder, value, grounding.split_by or None, root, Path(grounding.dataset).name, tasks)
    raise ConfigError(f"data.format {data.format!r} is not a referring-expression format; use one of {REC_FORMATS}")


def squash_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Transform:
    """OWL-ViT's preprocessing: resize to ``size = (height, width)`` (bicubic, aspect ratio not kept), normalise."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


class RecDataset(Dataset):
    """Detector inputs of referring-expression samples: item ``i`` = ``(image [3, H, W], expression, box [4] pixel
    xyxy, size [2] = (width, height), task, i)``, or ``None`` when the image fails to decode."""

    def __init__(
        self,
        samples: Sequence[RefSample],
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        strict: bool = False,
        source: str = "referring-expression samples",
    ) -> None:
        self.bad_samples = BadSamples()
        missing = drop_missing((Path(s.image) for s in samples), self.bad_samples, strict, source)
        self.samples = [s for s in samples if Path(s.image) not in missing]
        if samples and not self.samples:
            raise DataError(f"{source}: none of the {len(samples)} samples' images exist (first: {samples[0].image}); "
                            "check grounding.images / data.root")  # fmt: skip
        self.transform = squash_transform(size, mean, std)
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, str, torch.Tensor, torch.Tensor, int, int] | None:
        s = self.samples[i]
        image: Image.Image | None = load_or_skip(Path(s.image), None, self.bad_samples, self.strict)
        if image is None:
            return None
        box = torch.tensor(s.box, dtype=torch.float32)
        size = torch.tensor((s.width, s.height), dtype=torch.float32)
        return self.transform(image), s.expression, box, size, s.task, i


def distinct_images(samples: Sequence[RefSample]) -> list[RefSample]:
    """The first sample of each distinct image file, in order (an image described by several expressions once)."""
    first: dict[str, RefSample] = {}
    for s in samples:
        first.setdefault(s.image, s)
    return list(first.values())
