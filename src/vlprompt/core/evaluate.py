"""Evaluation of a method on a retrieval gallery (images or videos): features once, metrics from ``vlprompt.eval``."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vlprompt.data import collate_skip_none
from vlprompt.data.sources import EvalSet
from vlprompt.eval import bidirectional_metrics
from vlprompt.eval.ndcg import modal_balance_metrics
from vlprompt.eval.order import reversed_pair_accuracy
from vlprompt.eval.rouge import img2txt_from_txt2img, relevance_matrix
from vlprompt.methods import Method

#: ``cross-modal``: R@K only; the others add NDCG@K (see :func:`evaluate_retrieval`).
PROTOCOLS = ("cross-modal", "single-modal", "mixed", "all")


def autocast_context(device: torch.device, mode: str):
    """``torch.autocast`` for ``bf16``/``fp16``, a no-op for ``none``."""
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def split_visual_batch(batch: list) -> tuple[Tensor, Tensor | None, list]:
    """``(visual, mask or None, rest)`` of a collated batch: images carry no frame mask, videos do."""
    if batch[0].dim() == 5:
        return batch[0], batch[1], batch[2:]
    return batch[0], None, batch[1:]


@torch.no_grad()
def encode_gallery(
    method: Method, gallery: EvalSet, batch_size: int = 256, autocast: str = "none", num_workers: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Visual features ``[N_vis, E]``, text features ``[N_txt, E]`` and a mask of decodable visual items.

    The prompt plans are computed once for the whole gallery (they do not depend on the sample).
    """
    device = method.backbone.device
    was_training = method.training
    method.eval()
    plans = method.plans()
    visual_feats = torch.zeros(gallery.num_visual, method.backbone.embed_dim)
    ok = torch.zeros(gallery.num_visual, dtype=torch.bool)
    loader = DataLoader(gallery.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none)
    with autocast_context(device, autocast):
        for batch in loader:
            if batch is None:
                continue
            visual, mask, (index,) = split_visual_batch(batch)
            mask = mask.to(device) if mask is not None else None
            visual_feats[index] = method.encode_visual(visual.to(device), mask, plans).float().cpu()
            ok[index] = True
        text_feats = torch.cat(
            [
                method.encode_text(gallery.captions[i : i + batch_size], plans).float().cpu()
                for i in range(0, len(gallery.captions), batch_size)
            ]
        )
    method.train(was_training)
    return visual_feats, text_feats, ok


def evaluate_retrieval(
    method: Method,
    gallery: EvalSet,
    batch_size: int = 256,
    autocast: str = "none",
    num_workers: int = 0,
    protocol: str = "cross-modal",
    relevance: np.ndarray | None = None,
    official_ndcg: bool = False,
) -> dict[str, float]:
    """Text-to-visual and visual-to-text R@1/5/10, MdR, MnR and rsum on ``gallery``.

    ``protocol`` ``single-modal``, ``mixed`` or ``all`` adds RVLR's NDCG@10/20/50 (``i2i``/``t2t``,
    ``i2it``/``t2it``; :mod:`vlprompt.eval.ndcg`) with the caption-image ROUGE-L ``relevance``
    ``[num_captions, num_items]`` (computed from the gallery's captions when None). Items that fail to decode
    are dropped together with their captions (counted in the data report).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol != "cross-modal" and relevance is None:
        relevance = gallery_relevance(gallery)
    if relevance is not None and relevance.shape != (len(gallery.captions), gallery.num_visual):
        raise ValueError(
            f"relevance has shape {relevance.shape}, the gallery needs ({len(gallery.captions)}, {gallery.num_visual})"
        )
    visual_feats, text_feats, ok = encode_gallery(method, gallery, batch_size, autocast, num_workers)
    txt2vis = torch.as_tensor(gallery.txt2vis)
    order = {}
    if gallery.order_pairs:
        pairs = [(a, b) for a, b in gallery.order_pairs if ok[a] and ok[b]]
        order[f"{gallery.names[0]}/order_acc"] = reversed_pair_accuracy(
            text_feats, visual_feats, gallery.txt2vis, pairs
        )
    if not bool(ok.all()):
        keep_text = ok[txt2vis]
        new_index = torch.cumsum(ok.long(), 0) - 1
        visual_feats, text_feats, txt2vis = visual_feats[ok], text_feats[keep_text], new_index[txt2vis[keep_text]]
        relevance = None if relevance is None else relevance[keep_text.numpy()][:, ok.numpy()]
    metrics = {**bidirectional_metrics(text_feats, visual_feats, txt2vis.tolist(), names=gallery.names), **order}
    if protocol != "cross-modal":
        visual = gallery.names[1][0]  # "i" for images, "v" for videos
        ndcg = modal_balance_metrics(
            visual_feats, text_feats, txt2vis.tolist(), relevance, protocol, official=official_ndcg, visual=visual
        )
        metrics.update(ndcg)
    return metrics


def gallery_relevance(gallery: EvalSet) -> np.ndarray:
    """ROUGE-L relevance ``[num_captions, num_items]`` of a gallery's captions (RVLR's graded ground truth)."""
    return relevance_matrix(gallery.captions, img2txt_from_txt2img(gallery.txt2vis, gallery.num_visual))
