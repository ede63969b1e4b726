"""ImageNet and its distribution-shift variants (-A, -R, -V2, -Sketch) as classification test sets.

Every variant is an ImageFolder tree; what differs is the label space:

- ``imagenet`` (val, arranged as ``val/<wnid>/*.JPEG``) and ``imagenet-sketch``: 1000 classes, folders are wnids;
- ``imagenet-a`` and ``imagenet-r``: 200-class subsets, folders are wnids; label ``i`` is the ``i``-th subset wnid in
  ImageNet order, and ``ClassNames.source_indices`` maps it back to the 1000-class index;
- ``imagenet-v2`` (matched-frequency): folders are the class *indices* ``0 .. 999``. They are read as numbers, so
  the label of folder ``"10"`` is 10 (a plain ImageFolder would sort the names as strings: 0, 1, 10, 100, ...).

:class:`ClassificationFolder` reads any such tree against a fixed label space (also the embedded world's trees with
its ``classes.json``): missing class folders only shrink the test set, they never shift labels. The variants' label
spaces (:data:`~vlprompt.data.classnames.VARIANTS`, :func:`~vlprompt.data.classnames.variant_classes`) are class
names, so they live in :mod:`vlprompt.data.classnames`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vlprompt.data.classnames import ClassNames, variant_classes
from vlprompt.data.imagefolder import LabelledImageFiles
from vlprompt.data.media import Transform, drop_missing, image_files, log
from vlprompt.errors import DataError


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
