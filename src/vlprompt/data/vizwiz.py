"""VizWiz-Captions annotations to Karpathy/ALBEF records, so the ``karpathy`` reader trains and evaluates on them.

The official files (``annotations/train.json``, ``val.json``) are in the COCO-captions layout::

    {"images": [{"file_name": "VizWiz_val_00000000.jpg", "id": 23431, ...}],
     "annotations": [{"image_id": 23431, "caption": "...", "is_rejected": false, "is_precanned": false, ...}]}

Rejected captions and the pre-canned "Quality issues are too severe ..." captions are dropped by default (the
official evaluation drops rejected ones). RVLR evaluates on 1,000 VizWiz *val* images with 5 captions each; its
exact subset is not public, so ``--min-captions 5 --limit 1000`` takes the first such images in file order.

``python -m vlprompt.data.vizwiz IN.json OUT.json --style train|test --image-dir val``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from vlprompt.errors import DataError

Record = dict[str, Any]


def read_vizwiz(
    ann_file: str | os.PathLike,
    image_dir: str = "",
    style: str = "train",
    drop_rejected: bool = True,
    drop_precanned: bool = True,
    min_captions: int = 1,
    limit: int = 0,
) -> list[Record]:
    """Karpathy records of a VizWiz-Captions file: one per caption (``train``) or per image (``test``)."""
    if style not in ("train", "test"):
        raise ValueError(f"style must be 'train' or 'test', got {style!r}")
    try:
        raw = json.loads(Path(ann_file).read_text(encoding="utf-8"))
        images = {img["id"]: img["file_name"] for img in raw["images"]}
        annotations = raw["annotations"]
    except FileNotFoundError as err:
        raise DataError(f"VizWiz annotation file not found: {ann_file}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{ann_file}: not a VizWiz-Captions file (needs images and annotations): {err}") from err
    captions: dict[Any, list[str]] = {i: [] for i in images}
    for ann in annotations:
        if (drop_rejected and ann.get("is_rejected")) or (drop_precanned and ann.get("is_precanned")):
            continue
        if ann.get("image_id") not in captions:
            raise DataError(f"{ann_file}: caption {ann.get('id')} refers to unknown image {ann.get('image_id')!r}")
        captions[ann["image_id"]].append(str(ann["caption"]).strip())
    records: list[Record] = []
    kept = 0
    for image_id, caps in captions.items():
        if len(caps) < max(1, min_captions):
            continue
        path = f"{image_dir}/{images[image_id]}" if image_dir else images[image_id]
        if style == "train":
            records += [{"image": path, "caption": c, "image_id": str(image_id)} for c in caps]
        else:
            records.append({"image": path, "caption": caps[: min_captions if min_captions > 1 else None]})
        kept += 1
        if limit and kept >= limit:
            break
    if not records:
        raise DataError(f"{ann_file}: no image has {min_captions} usable captions")
    return records


def main(argv: list[str] | None = None) -> int:
    """Convert one file (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m vlprompt.data.vizwiz", description=__doc__.splitlines()[0])
    p.add_argument("ann_file")
    p.add_argument("out")
    p.add_argument("--style", default="train", choices=["train", "test"])
    p.add_argument("--image-dir", default="", help="folder of the images relative to data.root (e.g. train, val)")
    p.add_argument("--min-captions", type=int, default=1, help="keep images with at least this many captions")
    p.add_argument("--limit", type=int, default=0, help="keep the first N images (0 = all)")
    p.add_argument("--keep-rejected", action="store_true")
    p.add_argument("--keep-precanned", action="store_true")
    args = p.parse_args(argv)
    records = read_vizwiz(
        args.ann_file, args.image_dir, args.style, not args.keep_rejected, not args.keep_precanned,
        args.min_captions, args.limit,
    )  # fmt: skip
    Path(args.out).write_text(json.dumps(records))
    print(f"{args.out}: {len(records)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
