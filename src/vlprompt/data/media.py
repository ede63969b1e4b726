"""Image loading and the bad-sample report: one missing or corrupt file never kills a run.

Missing files are found when a dataset is built (a cheap existence check) and dropped there; files that exist
but fail to decode are found at load time, where the dataset returns ``None`` for the sample and
:func:`vlprompt.data.collate.collate_skip_none` drops it from the batch. ``strict=True`` turns either case into a
:class:`~vlprompt.errors.DataError`.

Counts made inside DataLoader worker processes stay in those workers: with ``num_workers > 0`` the main process
only sees what was found at construction time (missing files). The report is complete when ``num_workers=0``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlprompt.errors import DataError

log = logging.getLogger("vlprompt.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Reasons used in BadSamples; free-form strings are allowed, these are the ones the readers emit.
MISSING = "missing"
UNREADABLE = "unreadable"

Transform = Callable[[Image.Image], Any]


@dataclass
class BadSamples:
    """Counts of skipped media per reason, with the first few file names as examples."""

    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason with detail)

    @property
    def total(self) -> int:
        """Number of skipped files over all reasons."""
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def add(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        """Count one bad file; the first ``max_examples`` are remembered and logged as warnings."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            why = f"{reason}: {detail}" if detail else reason
            self.examples.append((str(path), why))
            log.warning("skipping %s (%s)", path, why)
            if len(self.examples) == self.max_examples:
                # Thousands of warnings would bury the one that matters; the rest are only counted.
                log.warning("further bad media files are counted but not logged")

    def summary(self) -> str:
        """One-paragraph description for logs and run reports."""
        if not self:
            return "no bad media files"
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        names = "; ".join(f"{name} ({why})" for name, why in self.examples)
        return f"skipped {self.total} media files ({counts}); first: {names}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for run metrics."""
        return {"total": self.total, "counts": dict(self.counts), "examples": [list(e) for e in self.examples]}

    def __str__(self) -> str:
        return self.summary()


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into RGB; raises DataError if it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            # convert() forces a full decode, so a truncated file fails here rather than inside a transform.
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports corrupt data through all of these, depending on the codec.
        raise DataError(f"cannot read image {path}: {e}") from e


def load_or_skip(path: Path, transform: Transform | None, bad: BadSamples, strict: bool) -> Any | None:
    """Load and transform one image; on a decode failure record it and return None (strict: raise)."""
    try:
        image = load_image(path)
    except DataError as e:
        if strict:
            raise
        bad.add(path, MISSING if isinstance(e.__cause__, FileNotFoundError) else UNREADABLE, str(e.__cause__))
        return None
    return transform(image) if transform is not None else image


def drop_missing(paths: Iterable[Path], bad: BadSamples, strict: bool, source: str) -> set[Path]:
    """Return the paths that do not exist, after recording them (strict: raise naming them)."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing and strict:
        shown = ", ".join(str(p) for p in missing[:5])
        raise DataError(f"{len(missing)} image file(s) listed by {source} are missing: {shown}")
    for p in missing:
        bad.add(p, MISSING)
    return set(missing)


def is_image_file(name: str) -> bool:
    """True if the file name has one of the accepted image extensions (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(folder: Path) -> list[Path]:
    """Image files below ``folder``, in a sorted walk: the same order (and seeded subsets) on every machine."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return found
