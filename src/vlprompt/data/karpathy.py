"""Karpathy/ALBEF JSON image-text retrieval annotations (COCO, Flickr30K as shipped by ALBEF, BLIP and LAVIS).

Two record shapes, both a JSON list of objects with extra keys allowed:

- train: one record per image-caption pair, ``{"image": "rel/path.jpg", "caption": "...", "image_id": "..."}``;
- val/test: one record per image, ``{"image": "rel/path.jpg", "caption": ["c1", "c2", ...]}``.

Both readers accept both shapes: training expands caption lists into pairs, evaluation groups pairs by image.
Images are identified by their resolved path (ALBEF keys training images by ``image_id``; for the published
files the two agree).

Relative image paths resolve against an image root (``data.root``; which root a config's split gets is decided in
one place, :func:`vlprompt.data.sources.split_files`). The folder the annotation file itself implies
(:func:`implied_image_root`) is checked against it: a split whose images exist under both as different files is
an error, never a silent choice.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlprompt.data.json_files import read_json
from vlprompt.data.media import BadSamples, Transform, drop_missing, load_or_skip, log
from vlprompt.errors import DataError

Record = dict[str, Any]
RecordFilter = Callable[[Record], bool]


def read_annotations(ann_file: str | os.PathLike) -> list[Record]:
    """Read and validate a Karpathy/ALBEF JSON file; any problem is a DataError naming file and record."""
    ann_file = Path(ann_file)
    records = read_json(ann_file)
    if not isinstance(records, list):
        raise DataError(
            f"{ann_file}: not a Karpathy-style JSON list (expected a JSON list of records, "
            f"got {type(records).__name__})"
        )
    for i, rec in enumerate(records):
        problem = _record_problem(rec)
        if problem:
            raise DataError(f"{ann_file}: record {i}: {problem}")
    return records


def _record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"expected an object, got {type(rec).__name__}"
    for key in ("image", "caption"):
        if key not in rec:
            return f"missing key {key!r}"
    if not isinstance(rec["image"], str) or not rec["image"]:
        return f"'image' must be a non-empty string, got {rec['image']!r}"
    cap = rec["caption"]
    if isinstance(cap, list):
        if not cap:
            return "'caption' is an empty list"
        bad = [c for c in cap if not isinstance(c, str)]
        if bad:
            return f"'caption' list must hold strings, found {type(bad[0]).__name__}"
    elif not isinstance(cap, str):
        return f"'caption' must be a string or a list of strings, got {type(cap).__name__}"
    return None


def _captions(rec: Record) -> list[str]:
    cap = rec["caption"]
    return list(cap) if isinstance(cap, list) else [cap]


#: How many of a file's first relative image paths are looked for when finding the folder it implies.
_PROBE_IMAGES = 16


def _relative_images(records: Iterable[Record]) -> list[str]:
    """The distinct relative image paths of ``records``, in file order."""
    return list(dict.fromkeys(r["image"] for r in records if not Path(r["image"]).is_absolute()))


def _find_image_root(ann_file: Path, records: Sequence[Record]) -> Path | None:
    """The nearest folder, from the annotation file's own upwards, under which one of its first images exists."""
    probe = _relative_images(records)[:_PROBE_IMAGES]
    if not probe:
        return None
    for folder in [ann_file.parent, *ann_file.parent.parents]:
        if any((folder / rel).is_file() for rel in probe):
            return folder
    return None


@functools.lru_cache(maxsize=32)
def _implied_image_root(path: str, mtime_ns: int, size: int) -> Path:
    # keyed by the file's stat, so an edited file is read again
    ann_file = Path(path)
    return _find_image_root(ann_file, read_annotations(ann_file)) or ann_file.parent


def implied_image_root(ann_file: str | os.PathLike) -> Path:
    """The folder ``ann_file``'s relative image paths point into when no image root is given: its own folder, or
    the nearest folder above it that holds its images (``world/retrieval/test.json`` -> ``world/``)."""
    ann_file = Path(ann_file)
    try:
        stat = ann_file.stat()
    except OSError as e:
        raise DataError(f"annotation file not found: {ann_file}") from e
    return _implied_image_root(str(ann_file), stat.st_mtime_ns, stat.st_size)


def same_folder(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one folder (through links and relative spellings)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _clashing_images(relative: Sequence[str], root: Path, other: Path) -> list[str]:
    """Relative paths that name one file under ``root`` and a different existing file under ``other``."""
    clashes, top_exists = [], {}
    for rel in relative:
        top = Path(rel).parts[0]
        if top not in top_exists:  # one stat per top-level name: a tree that is not there costs nothing
            top_exists[top] = (other / top).exists()
        if top_exists[top] and (other / rel).is_file() and (root / rel).is_file():
            if not os.path.samefile(root / rel, other / rel):
                clashes.append(rel)
    return clashes


def _load_kept(
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike,
    strict: bool,
    filter: RecordFilter | None,
    check_ambiguity: bool = True,
) -> tuple[list[tuple[Path, Record]], BadSamples]:
    """Records that pass the filter and whose image exists, each with its resolved path."""
    ann_file = Path(ann_file)
    every = read_annotations(ann_file)
    if not every:
        raise DataError(f"{ann_file} holds no records (an empty list)")
    records = [r for r in every if filter(r)] if filter is not None else every
    root = Path(image_root)
    # Path's "/" keeps an absolute right-hand side as-is, which is exactly the rule for absolute image paths.
    resolved = [(root / r["image"], r) for r in records]
    bad = BadSamples()
    missing = drop_missing((p for p, _ in resolved), bad, strict, source=str(ann_file))
    kept = [(p, r) for p, r in resolved if p not in missing]
    implied = _find_image_root(ann_file, every) if check_ambiguity or not kept else None
    elsewhere = implied is not None and not same_folder(implied, root)
    if not kept:
        if not records:
            raise DataError(f"{ann_file}: no usable records (the filter kept no records)")
        hint = f"; they are under {implied}: give that folder as the image root (data.root)" if elsewhere else ""
        raise DataError(f"{ann_file}: no usable records (none of the images exist under {root}{hint})")
    if check_ambiguity and elsewhere:
        clashes = _clashing_images(_relative_images(r for _, r in kept), root, implied)
        if clashes:
            raise DataError(
                f"{ann_file}: {len(clashes)} of its images exist both under the image root {root} (data.root) "
                f"and under {implied} (where the annotation file points) as different files, e.g. {clashes[0]!r}; "
                "say which to use: data.images_from=root or data.images_from=annotation"
            )
    if missing:
        # A wrong image_root shows up as many missing files; say where we looked.
        n_images = len({p for p, _ in resolved})
        log.warning("%s: %d of %d images missing (image_root=%s)", ann_file, len(missing), n_images, root)
    return kept, bad


class ImageTextPairs(Dataset):
    """Training pairs: item = (image, caption, image_index), where image_index numbers unique images.

    ``filter`` sees each raw record (e.g. ``lambda r: r["category"] == task`` for one continual task). A sample
    whose image fails to decode comes back as ``None``; use :func:`~vlprompt.data.collate.collate_skip_none`.
    ``check_ambiguity=False`` skips the check against the folder the annotation file implies (the caller chose).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Transform | None,
        strict: bool = False,
        filter: RecordFilter | None = None,
        check_ambiguity: bool = True,
    ) -> None:
        kept, self.bad_samples = _load_kept(ann_file, image_root, strict, filter, check_ambiguity)
        self.transform = transform
        self.strict = strict
        index: dict[Path, int] = {}
        self.pairs: list[tuple[int, str]] = []
        for path, rec in kept:
            img = index.setdefault(path, len(index))
            self.pairs.extend((img, c) for c in _captions(rec))
        self.image_paths: list[Path] = list(index)

    @property
    def num_images(self) -> int:
        """Number of distinct images behind the pairs."""
        return len(self.image_paths)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Any, str, int] | None:
        img, caption = self.pairs[i]
        image = load_or_skip(self.image_paths[img], self.transform, self.bad_samples, self.strict)
        return None if image is None else (image, caption, img)


@dataclass
class RetrievalGallery:
    """An evaluation set: images, all captions, and the ground-truth links in both directions."""

    image_paths: list[Path]
    captions: list[str]
    txt2img: list[int]  # caption index -> its image index
    img2txt: list[list[int]]  # image index -> its caption indices
    records: list[Record]  # per image: the raw record, or the first one with all captions if pairs were grouped
    bad_samples: BadSamples = field(default_factory=BadSamples)

    @property
    def num_images(self) -> int:
        """Number of gallery images."""
        return len(self.image_paths)


def load_gallery(
    ann_file: str | os.PathLike,
    image_root: str | os.PathLike,
    strict: bool = False,
    filter: RecordFilter | None = None,
    check_ambiguity: bool = True,
) -> RetrievalGallery:
    """Read a val/test file (or a train file, grouped by image) into a RetrievalGallery."""
    kept, bad = _load_kept(ann_file, image_root, strict, filter, check_ambiguity)
    # Missing images were dropped above, so numbering here is dense and both link lists agree by construction.
    groups: dict[Path, list[Record]] = {}
    for path, rec in kept:
        groups.setdefault(path, []).append(rec)
    captions: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    records: list[Record] = []
    for img, recs in enumerate(groups.values()):
        caps = [c for r in recs for c in _captions(r)]
        img2txt.append(list(range(len(captions), len(captions) + len(caps))))
        captions.extend(caps)
        txt2img.extend([img] * len(caps))
        records.append(recs[0] if len(recs) == 1 else {**recs[0], "caption": caps})
    return RetrievalGallery(list(groups), captions, txt2img, img2txt, records, bad)


class GalleryImages(Dataset):
    """The gallery's images: item = (image, image_index), or None if the file fails to decode."""

    def __init__(self, gallery: RetrievalGallery, transform: Transform | None, strict: bool = False) -> None:
        self.gallery = gallery
        self.transform = transform
        self.strict = strict
        self.bad_samples = gallery.bad_samples  # shared, so one report covers construction and loading

    def __len__(self) -> int:
        return self.gallery.num_images

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        image = load_or_skip(self.gallery.image_paths[i], self.transform, self.bad_samples, self.strict)
        return None if image is None else (image, i)
