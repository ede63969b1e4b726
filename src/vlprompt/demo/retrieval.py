"""Demo sections ``retrieval`` and ``video``: zero-shot vs adapted retrieval on the embedded world.

``retrieval``: zero-shot vs CoOp vs VPT-deep vs MaPLe on image-text retrieval in shifted domains (the sketch domain;
``--full`` every shifted domain). ``video``: order-sensitive text-video retrieval, meanP (zero-shot, fine-tuned) vs
DGL-Linear vs DGL-Transformer (``--full`` all four rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlprompt.data.world import layout
from vlprompt.demo.sections import Row, register_section, section_rows

METRICS = ("t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10")
VIDEO_METRICS = ("t2v/R@1", "t2v/R@5", "t2v/R@10", "v2t/R@1", "v2t/R@5", "v2t/R@10", "t2v/order_acc")


@register_section("retrieval")
def retrieval_shift_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """Zero-shot vs CoOp vs VPT-deep vs MaPLe on image-text retrieval in shifted domains."""
    rows = []
    for domain in layout.SHIFTED_DOMAINS if full else ("sketch",):
        data = [f"data.root={world}", f"data.train=retrieval/train_{domain}.json",
                f"data.val=retrieval/val_{domain}.json", f"data.test=retrieval/test_{domain}.json"]  # fmt: skip
        recipes = ["shift_zeroshot", "shift_coop", "shift_vpt", "shift_maple"]
        rows += section_rows("retrieval under domain shift", recipes, data, domain, METRICS, ctx)
    return rows


@register_section("video")
def video_rows(world: Path, full: bool, ctx: dict[str, Any]) -> list[Row]:
    """Order-sensitive text-video retrieval: meanP (zero-shot, fine-tuned) vs DGL-Linear vs DGL-Transformer."""
    recipes = ["video_zeroshot", "video_meanp", "video_dgl_linear", "video_dgl_transformer"]
    if not full:
        recipes = ["video_zeroshot", "video_dgl_transformer"]
    data = [f"data.root={layout.video_root(world)}"]
    return section_rows("order-sensitive text-video retrieval", recipes, data, "video", VIDEO_METRICS, ctx)
