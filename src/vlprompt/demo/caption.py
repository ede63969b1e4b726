"""Demo section ``caption``: the shipped world captioner, zero-shot and with RLCF, on the world's shifted domains.

The captioners are the shipped ones (``vlprompt-world-lm`` + ``vlprompt-world-clipcap`` / ``-capdec``, on the tiny
CLIP's image embeddings); RLCF adapts the mapper per test image (``configs/world/rlcf_caption_*.yaml``) with the
larger ``vlprompt-small`` as its reward CLIP, as the ``tta`` section does; ``--full`` adds RLCF-S (both embedded CLIPs
as rewards). Rows: B@4, CIDEr and SPICE on coco-caption's scale x100 (SPICE only where Java and its CoreNLP jars are
present, else left out with the reason in the row's ``unavailable``), CLIP-S and RefCLIP-S x100 by the policy CLIP
(``vlprompt-tiny``, not the reward model), and milliseconds per image. The default run covers the first
:data:`IMAGES` test images of the sketch domain; ``--full`` :data:`FULL_IMAGES` images of every shifted domain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlprompt.backbone.embedded_captioner import load_mapper_weights
from vlprompt.config import load_config
from vlprompt.data.world import layout
from vlprompt.demo.sections import CONFIGS, Row, register_section
from vlprompt.runners.caption import caption_images

SECTION = "captioning (RLCF)"
NOTE = ("Each test image is captioned by the shipped world captioner (beam 5); RLCF rows adapt the mapper on that "
        "image alone (T steps of K-beam candidates rewarded by vlprompt-small), caption it, then restore the mapper. "
        "B@4, CIDEr, SPICE: coco-caption x100 against the image's 5 references; CLIP-S / RefCLIP-S: CLIPScore and "
        "RefCLIPScore x100 by vlprompt-tiny (not the reward model; RLCF-S rewards include it); ms/sample: "
        "milliseconds per test image of adaptation and captioning (model loading not included).")  # fmt: skip
#: Test images per domain: the default run, and ``--full``.
IMAGES, FULL_IMAGES = 24, 12  # RLCF costs ~8-10 s per image and row on 2 loaded cores: --full has 30 rows
#: (row label, recipe, adaptation, extra overrides).
RECIPES = (
    ("ClipCap", "rlcf_caption_clipcap", "none", []),
    ("ClipCap + RLCF", "rlcf_caption_clipcap", None, []),
    ("CapDec", "rlcf_caption_capdec", "none", []),
    ("CapDec + RLCF", "rlcf_caption_capdec", None, []),
)
#: RLCF-S (``--full``): both embedded CLIPs as rewards, equal weights.
RLCF_S = ["method.reward=[vlprompt-small,vlprompt-tiny]", "method.reward_pretrained=[world]"]
_SCALED = {"BLEU-4": "B@4", "CIDEr": "CIDEr", "SPICE": "SPICE", "CLIPScore": "CLIP-S", "RefCLIPScore": "RefCLIP-S"}


def _subset(world: Path, domain: str, images: int, out: Path) -> Path:
    """The first ``images`` images of a domain's test file (with their references), written under ``out``."""
    records = json.loads(layout.retrieval_file(world, "test", domain).read_text())[:images]
    path = out / "caption_data" / f"test_{domain}_{len(records)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def row_metrics(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The demo's columns of a :func:`~vlprompt.runners.caption.caption_images` summary (one domain), and the
    metrics that could not run with their reasons."""
    scores = summary["metrics"][next(iter(summary["metrics"]))]
    metrics = {name: 100.0 * scores[key] for key, name in _SCALED.items() if scores.get(key) is not None}
    unavailable = {_SCALED.get(k, k): v for k, v in (scores.get("unavailable") or {}).items() if k in _SCALED}
    return metrics | {"ms/sample": 1000.0 * summary["seconds_per_image"]}, unavailable


def _recipes(full: bool) -> list[tuple[str, str, str | None, list[str]]]:
    rows = list(RECIPES)
    if full:
        rows.insert(2, ("ClipCap + RLCF-S", "rlcf_caption_clipcap", None, RLCF_S))
        rows.append(("CapDec + RLCF-S", "rlcf_caption_capdec", None, RLCF_S))
    return rows


@register_section("caption", notes={SECTION: NOTE})
def caption_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """ClipCap and CapDec, zero-shot and + RLCF (and RLCF-S with ``--full``), per shifted domain."""
    rows = []
    for domain in layout.SHIFTED_DOMAINS if full else ("sketch",):
        data = _subset(world, domain, FULL_IMAGES if full else IMAGES, ctx["out"])
        for label, recipe, tta, extra in _recipes(full):
            ctx["console"].print(f"[bold]caption[/bold]: {label} ({domain}) ...")
            name = f"caption_{label.lower().replace(' + ', '_').replace('-', '')}_{domain}"
            overrides = [f"data.root={world}", f"out_dir={ctx['out']}", f"run_name={name}", *extra, *ctx["overrides"]]
            start = time.perf_counter()
            summary = caption_images(CONFIGS / f"{recipe}.yaml", overrides, annotations=data, image_root=world,
                                     tta=tta, out=Path(ctx["out"]) / name)  # fmt: skip
            metrics, unavailable = row_metrics(summary)
            trainable = 0 if tta == "none" else _mapper_size(recipe, overrides)
            rows.append(Row(SECTION, label, domain, metrics, trainable, round(time.perf_counter() - start, 1),
                            {"images": summary["images"], "unavailable": unavailable,
                             "tta": summary["tta"]}))  # fmt: skip
    return rows


def _mapper_size(recipe: str, overrides: list[str]) -> int:
    """Parameters RLCF tunes: the mapper's (read from the stored file, without building the captioner)."""
    source = load_config(CONFIGS / f"{recipe}.yaml", overrides).method["mapper_weights"]
    return sum(t.numel() for t in load_mapper_weights(source)[0].values())
