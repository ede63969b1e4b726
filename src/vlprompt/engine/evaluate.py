"""Evaluation of a method on a retrieval gallery: features once, metrics from ``vlprompt.eval``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vlprompt.data import GalleryImages, RetrievalGallery, collate_skip_none
from vlprompt.eval import bidirectional_metrics
from vlprompt.methods import Method


def autocast_context(device: torch.device, mode: str):
    """``torch.autocast`` for ``bf16``/``fp16``, a no-op for ``none``."""
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


@torch.no_grad()
def encode_gallery(
    method: Method,
    gallery: RetrievalGallery,
    transform: Callable,
    batch_size: int = 256,
    autocast: str = "none",
    num_workers: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Image features ``[N_img, E]``, text features ``[N_txt, E]`` and a mask of decodable images.

    The prompt plans are computed once for the whole gallery (they do not depend on the sample).
    """
    device = method.backbone.device
    was_training = method.training
    method.eval()
    plans = method.plans()
    image_feats = torch.zeros(gallery.num_images, method.backbone.embed_dim)
    ok = torch.zeros(gallery.num_images, dtype=torch.bool)
    loader = DataLoader(
        GalleryImages(gallery, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none
    )
    with autocast_context(device, autocast):
        for batch in loader:
            if batch is None:
                continue
            images, index = batch
            image_feats[index] = method.encode_image(images.to(device), plans).float().cpu()
            ok[index] = True
        text_feats = torch.cat(
            [
                method.encode_text(gallery.captions[i : i + batch_size], plans).float().cpu()
                for i in range(0, len(gallery.captions), batch_size)
            ]
        )
    method.train(was_training)
    return image_feats, text_feats, ok


def evaluate_retrieval(
    method: Method,
    gallery: RetrievalGallery,
    transform: Callable,
    batch_size: int = 256,
    autocast: str = "none",
    names: tuple[str, str] = ("t2i", "i2t"),
    num_workers: int = 0,
) -> dict[str, float]:
    """Text-to-image and image-to-text R@1/5/10, MdR, MnR and rsum on ``gallery``.

    Images that fail to decode are dropped together with their captions (counted in the data report).
    """
    image_feats, text_feats, ok = encode_gallery(method, gallery, transform, batch_size, autocast, num_workers)
    txt2img = torch.as_tensor(gallery.txt2img)
    if not bool(ok.all()):
        keep_text = ok[txt2img]
        new_index = torch.cumsum(ok.long(), 0) - 1
        image_feats, text_feats, txt2img = image_feats[ok], text_feats[keep_text], new_index[txt2img[keep_text]]
    return bidirectional_metrics(text_feats, image_feats, txt2img.tolist(), names=names)
