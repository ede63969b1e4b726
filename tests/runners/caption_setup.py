"""Shared set-up of the captioning run tests: a tiny random OPT saved as a local folder, config overrides, images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from backbone.caption_helpers import tiny_lm  # tests/ is on sys.path (rootdir-relative packages)
from vlprompt.backbone.captioner import CaptionTokenizer

#: A tiny captioner on vlprompt-tiny: open_clip's BPE (whole words), a 2-layer mapper, short beam searches.
CAPTIONER = [
    "method.tokenizer=clip-bpe", "method.prefix_length=4", "method.clip_length=3", "method.mapper_layers=2",
    "method.mapper_heads=4", "method.max_new_tokens=5", "method.final_beams=2",
]  # fmt: skip


def save_tiny_lm(folder: Path) -> Path:
    """A 2-layer OPT of width 32 over open_clip's BPE vocabulary, saved like a downloaded model."""
    tiny_lm("opt", CaptionTokenizer.clip_bpe().vocab_size, seed=0).save_pretrained(folder)
    return folder


def train_overrides(lm: Path, data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """Overrides of a 2-step ClipCap run on the conftest's image-text set."""
    return [
        "method.name=clipcap", f"method.lm={lm}", *CAPTIONER, f"data.root={data}", "data.train=train.json",
        "data.val=val.json", "data.test=test.json", "train.epochs=1", "train.max_steps=2", "train.batch_size=8",
        "train.lr=0.001", "train.eval_batch_size=8", f"out_dir={out}", f"run_name={name}", *extra,
    ]  # fmt: skip


def three_images(folder: Path) -> Path:
    """Three generated images with clearly different content (colour blocks), names in caption order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 230)]):
        image = Image.new("RGB", (64, 64), (250, 250, 250))
        image.paste(colour, (8 * i, 8, 40 + 8 * i, 56))
        image.save(folder / f"img{i}.png")
    return folder
