"""Images to caption and their reference captions: a folder, a Karpathy file (COCO, Flickr30K) or a COCO-caption
style file (nocaps validation, COCO's ``captions_val2014.json``).

Every source becomes a :class:`CaptionSet`: one entry per image, its reference captions (none for a folder) and its
domain. nocaps' validation JSON is COCO-caption shaped, ``{"images": [{"id", "file_name", "domain", ...}],
"annotations": [{"image_id", "caption"}, ...]}``, with ``domain`` one of ``in-domain`` / ``near-domain`` /
``out-domain`` (the split RLCF's Table 3 reports); images without a ``domain`` (COCO) are in domain ``all``.
A Karpathy file is read by :mod:`vlprompt.data.karpathy` (every image is in domain ``all``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlprompt.data.json_files import read_json
from vlprompt.data.karpathy import implied_image_root, load_gallery
from vlprompt.data.media import BadSamples, Transform, drop_missing, image_files, load_or_skip
from vlprompt.errors import DataError

#: The domain of images whose annotation file names none.
ALL_DOMAINS = "all"
#: nocaps' domains, in the order its leaderboard lists them.
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


@dataclass
class CaptionSet:
    """Images to caption: path, id (a JSON-safe key of the output), references (``None``: a folder) and domain."""

    image_paths: list[Path]
    ids: list[str]
    references: list[list[str]] | None
    domains: list[str]
    source: str  # what was read (for the output's header)
    bad_samples: BadSamples = field(default_factory=BadSamples)

    def __len__(self) -> int:
        return len(self.image_paths)


def folder_caption_set(folder: str | os.PathLike) -> CaptionSet:
    """Every image file below ``folder`` (sorted walk); ids are paths relative to the folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = image_files(folder)
    if not paths:
        raise DataError(f"{folder} holds no image files (.png, .jpg, .jpeg, .bmp, .webp)")
    ids = [p.relative_to(folder).as_posix() for p in paths]
    return CaptionSet(paths, ids, None, [ALL_DOMAINS] * len(paths), str(folder))


def _coco_caption_set(ann: Path, raw: dict[str, Any], root: Path) -> CaptionSet:
    images, annotations = raw.get("images"), raw.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{ann}: a COCO-caption / nocaps file needs the lists 'images' and 'annotations'")
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(annotations):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise DataError(f"{ann}: annotations[{i}] needs 'image_id' and a string 'caption'")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    paths, ids, references, domains = [], [], [], []
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{ann}: images[{i}] needs 'id' and a string 'file_name'")
        domain = im.get("domain", ALL_DOMAINS)
        if not isinstance(domain, str):
            raise DataError(f"{ann}: images[{i}] has a non-string domain {domain!r}")
        if im["id"] not in refs:
            raise DataError(f"{ann}: image {im['id']} ({im['file_name']}) has no caption in 'annotations'")
        paths.append(root / im["file_name"])
        ids.append(str(im["id"]))
        references.append(refs[im["id"]])
        domains.append(domain)
    return CaptionSet(paths, ids, references, domains, str(ann))


def _karpathy_caption_set(ann: Path, root: Path, strict: bool) -> CaptionSet:
    gallery = load_gallery(ann, root, strict, check_ambiguity=False)
    refs = [[gallery.captions[t] for t in texts] for texts in gallery.img2txt]
    ids = [str(r.get("image_id", p.relative_to(root).as_posix() if p.is_relative_to(root) else p))
           for r, p in zip(gallery.records, gallery.image_paths)]  # fmt: skip
    out = CaptionSet(gallery.image_paths, ids, refs, [ALL_DOMAINS] * len(ids), str(ann))
    out.bad_samples = gallery.bad_samples  # images the file lists that are missing, already recorded
    return out


def annotation_caption_set(
    ann_file: str | os.PathLike, image_root: str | os.PathLike | None = None, strict: bool = False
) -> CaptionSet:
    """The images and references of a Karpathy (JSON list) or COCO-caption / nocaps (JSON object) file.

    Relative image paths resolve against ``image_root``; without one, a Karpathy file's implied image root
    (:func:`~vlprompt.data.karpathy.implied_image_root`) and a COCO-caption file's own folder. Missing images are
    skipped and recorded (``strict``: an error); a file none of whose images exist is an error.
    """
    ann = Path(ann_file).expanduser()
    raw = read_json(ann)
    if isinstance(raw, list):
        root = Path(image_root).expanduser() if image_root else implied_image_root(ann)
        out = _karpathy_caption_set(ann, root, strict)
    elif isinstance(raw, dict):
        root = Path(image_root).expanduser() if image_root else ann.parent
        out = _coco_caption_set(ann, raw, root)
        missing = drop_missing(out.image_paths, out.bad_samples, strict, str(ann))
        keep = [i for i, p in enumerate(out.image_paths) if p not in missing]
        if missing and not keep:
            raise DataError(f"none of the {len(missing)} images of {ann} exists under {root} (pass the image root)")
        out = CaptionSet([out.image_paths[i] for i in keep], [out.ids[i] for i in keep],
                         [out.references[i] for i in keep], [out.domains[i] for i in keep], out.source,
                         out.bad_samples)  # fmt: skip
    else:
        raise DataError(f"{ann}: expected a Karpathy JSON list or a COCO-caption / nocaps JSON object, "
                        f"got {type(raw).__name__}")  # fmt: skip
    if not len(out):
        raise DataError(f"{ann}: no image to caption ({out.bad_samples.summary() or 'the file lists none'})")
    return out


class CaptionImages(Dataset):
    """Item ``i`` = (transformed image ``i``, ``i``), or None when the file fails to decode (recorded)."""

    def __init__(self, images: CaptionSet, transform: Transform | None, strict: bool = False) -> None:
        self.images, self.transform, self.strict = images, transform, strict

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        image = load_or_skip(self.images.image_paths[i], self.transform, self.images.bad_samples, self.strict)
        return None if image is None else (image, i)
