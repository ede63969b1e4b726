"""ImageFolder-style classification data: ``root/<class_name>/**/<image file>``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlprompt.data.media import IMAGE_EXTENSIONS, BadSamples, Transform, drop_missing, image_files, load_or_skip, log
from vlprompt.errors import DataError


class LabelledImageFiles(Dataset):
    """Item = (image, label) of ``samples`` (a list of ``(path, label)``); a file that fails to decode comes back as
    ``None`` and is counted in ``bad_samples`` (``strict``: an error). Subclasses fill ``samples``."""

    def __init__(self, root: Path, transform: Transform | None, strict: bool) -> None:
        self.root, self.transform, self.strict = root, transform, strict
        self.bad_samples = BadSamples()
        self.samples: list[tuple[Path, int]] = []

    @property
    def targets(self) -> list[int]:
        """Label of every sample, in sample order."""
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, label = self.samples[i]
        image = load_or_skip(path, self.transform, self.bad_samples, self.strict)
        return None if image is None else (image, label)


class ImageFolderDataset(LabelledImageFiles):
    """Item = (image, label). Classes are the sorted sub-folders, or ``classes`` in the given order.

    An explicit ``classes`` list fixes the label order (e.g. from a split file) and may name a subset of the
    folders; every class it names must have a folder. A file that fails to decode comes back as ``None``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None,
        classes: Sequence[str] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(Path(root), transform, strict)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if classes is None:
            classes = folders
        else:
            absent = [c for c in classes if c not in folders]
            if absent:
                raise DataError(f"{self.root}: no folder for class(es) {', '.join(absent[:5])}")
            if len(set(classes)) != len(classes):
                raise DataError(f"{self.root}: the class list names a class twice")
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            found = image_files(self.root / name)
            if not found:
                log.warning("%s: class %r has no image files", self.root, name)
            samples.extend((p, label) for p in found)
        # Files were just listed, so "missing" here means broken links or files deleted while scanning.
        missing = drop_missing((p for p, _ in samples), self.bad_samples, strict, source=str(self.root))
        self.samples = [(p, y) for p, y in samples if p not in missing]
        if not self.samples:
            raise DataError(f"{self.root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in any class folder")
