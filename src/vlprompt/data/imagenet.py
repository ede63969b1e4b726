"""ImageNet and its distribution-shift variants (-A, -R, -V2, -Sketch) as classification test sets.

Every variant is an ImageFolder tree; what differs is the label space:

- ``imagenet`` (val, arranged as ``val/<wnid>/*.JPEG``) and ``imagenet-sketch``: 1000 classes, folders are wnids;
- ``imagenet-a`` and ``imagenet-r``: 200-class subsets, folders are wnids; label ``i`` is the ``i``-th subset wnid in
  ImageNet order, and ``ClassNames.source_indices`` maps it back to the 1000-class index;
- ``imagenet-v2`` (matched-frequency): folders are the class *indices* ``0 .. 999``. They are read as numbers, so
  the label of folder ``"10"`` is 10 (a plain ImageFolder would sort the names as strings: 0, 1, 10, 100, ...).

:class:`ClassificationFolder` reads any such tree against a fixed label space (also the embedded world's trees with
its ``classes.json``): missing class folders only shrink the test set, they never shift labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlprompt.data.classnames import ClassNames, imagenet_classnames
from vlprompt.data.imagefolder import LabelledImageFiles
from vlprompt.data.imagenet_wnids import IN1K_IDS, IN_A_IDS, IN_R_IDS
from vlprompt.data.media import Transform, drop_missing, image_files, log
from vlprompt.errors import ConfigError, DataError


@dataclass(frozen=True)
class Variant:
    """How one ImageNet variant names its folders and which ImageNet-1k classes it holds."""

    description: str
    subset: tuple[str, ...] | None = None  # wnids of a class subset (None = all 1000)
    index_folders: bool = False  # folders are class indices (ImageNet-V2), not wnids


VARIANTS: dict[str, Variant] = {
    "imagenet": Variant("ImageNet-1k validation set, val/<wnid>/*.JPEG (50,000 images)"),
    "imagenet-a": Variant("ImageNet-A, <wnid>/*.jpg, 200 classes (7,500 images)", tuple("n" + w for w in IN_A_IDS)),
    "imagenet-r": Variant("ImageNet-R, <wnid>/*.jpg, 200 classes (30,000 images)", tuple("n" + w for w in IN_R_IDS)),
    "imagenet-v2": Variant("ImageNet-V2 matched-frequency, <class index>/*.jpeg (10,000 images)", index_folders=True),
    "imagenet-sketch": Variant("ImageNet-Sketch, <wnid>/*.JPEG, 1000 classes (50,889 images)"),
}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in label order."""
    return ["n" + w for w in IN1K_IDS]


def variant_classes(name: str) -> ClassNames:
    """The label space of an ImageNet variant: CLIP's class names, folders and ImageNet-1k indices."""
    variant = _variant(name)
    names, wnids = imagenet_classnames(), imagenet_wnids()
    if variant.subset is not None:
        index = {w: i for i, w in enumerate(wnids)}
        indices = [index[w] for w in variant.subset]
    else:
        indices = list(range(len(wnids)))
    folders = [str(i) if variant.index_folders else wnids[i] for i in indices]
    return ClassNames(tuple(names[i] for i in indices), tuple(folders), source_indices=tuple(indices))


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown ImageNet variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


class ClassificationFolder(LabelledImageFiles):
    """Item = (image, label) with labels from a fixed :class:`ClassNames` (``classes.folders[label]``).

    Class folders that are absent are reported once and skipped; folders outside the label space are ignored
    with a warning. A file that fails to decode comes back as ``None`` (``strict``: an error).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: ClassNames,
        transform: Transform | None = None,
        strict: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(Path(root), transform, strict)
        self.classes = classes
        where = name or str(self.root)
        if not self.root.is_dir():
            raise DataError(f"{where}: image folder not found: {self.root}")
        folders = classes.folders or classes.names
        present = {d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        missing = [f for f in folders if f not in present]
        extra = sorted(present - set(folders))
        if missing:
            log.warning("%s: %d of %d class folders missing under %s (first: %s)", where, len(missing),
                        len(folders), self.root, ", ".join(missing[:3]))  # fmt: skip
        if extra:
            log.warning("%s: ignoring %d folders outside the label space (first: %s)", where, len(extra), extra[0])
        samples = [(p, label) for label, f in enumerate(folders) if f in present for p in image_files(self.root / f)]
        gone = drop_missing((p for p, _ in samples), self.bad_samples, strict, source=where)
        self.samples = [(p, y) for p, y in samples if p not in gone]
        if not self.samples:
            raise DataError(f"{where}: no image files in any of the {len(folders)} class folders under {self.root}")


def read_variant(
    name: str, root: str | os.PathLike, transform: Callable | None = None, strict: bool = False
) -> ClassificationFolder:
    """The test set of ImageNet variant ``name`` under ``root`` (the folder holding the class folders)."""
    return ClassificationFolder(root, variant_classes(name), transform, strict, name=name)
