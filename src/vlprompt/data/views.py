"""Test-time views of one image, made as one batch: TPT's centre crop plus random resized crops (and AugMix).

View 0 is the plain evaluation view (resize with bicubic, centre crop). Views 1..N-1 are random resized crops
(torchvision's sampling: area scale (0.08, 1), aspect ratio (3/4, 4/3), 10 tries then a centre crop) with a
horizontal flip half of the time. All crops are cut and resized in one ``roi_align`` call (bilinear, with
adaptive area sampling so that downscaling does not alias), then normalised together.

AugMix-style views (TPT's setting for fine-grained sets): each random crop is mixed with three chains of 1-3
operations at severity 1 (autocontrast, equalize, posterize, rotate, solarize, shear x/y, translate x/y; no
colour, contrast, brightness or sharpness ops), chain weights ~ Dirichlet(1, 1, 1), then mixed with the plain
crop by m ~ Beta(1, 1). Mixing before or after normalisation is the same (normalisation is affine).

Every random draw comes from the ``torch.Generator`` passed in, so a sample's views are a pure function of its
seed: episodic results do not depend on the order of the test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode

AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
              "translate_y")  # fmt: skip


class TTAViews:
    """``views(image, generator) -> [N, 3, S, S]`` normalised views of one PIL image (or uint8/float tensor).

    Args:
        image_size: output side ``S``.
        n_views: ``N`` including the centre view (TPT: 64).
        mean, std: normalisation of the model.
        augmix: AugMix-style mixing of the random views.
        scale, ratio: random resized crop ranges.
        flip: random horizontal flips of the random views.
    """

    def __init__(
        self,
        image_size: int,
        n_views: int = 64,
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        augmix: bool = False,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        self.size = image_size
        self.n_views = n_views
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.augmix = augmix
        self.scale, self.ratio, self.flip = scale, ratio, flip

    def __call__(self, image: Image.Image | Tensor, generator: torch.Generator | None = None) -> Tensor:
        pil = image if isinstance(image, Image.Image) else TF.to_pil_image(image)
        pil = pil.convert("RGB")
        centre = TF.center_crop(TF.resize(pil, self.size, InterpolationMode.BICUBIC), self.size)
        views = [TF.to_dtype(TF.pil_to_tensor(centre), torch.float32, scale=True).unsqueeze(0)]
        if self.n_views > 1:
            # crops of a very large image would average many pixels per output bin; a short side of 4x the
            # output keeps even the smallest crops (~0.28 of the side) above output resolution
            limit = 4 * self.size
            if min(pil.size) > limit:
                pil = TF.resize(pil, limit, InterpolationMode.BICUBIC)
            source = TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True)
            crops = self.random_crops(source, self.n_views - 1, generator)
            if self.augmix:
                crops = augmix(crops, generator)
            views.append(crops)
        return (torch.cat(views).clamp_(0, 1) - self.mean) / self.std

    def crop_boxes(self, height: int, width: int, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, 4]`` boxes ``(x1, y1, x2, y2)`` with torchvision's RandomResizedCrop sampling (10 tries each)."""
        tries = 10
        area = height * width
        target = area * torch.empty(n, tries).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                   generator=generator)  # fmt: skip
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        # fallback (no try fits): the largest centred crop with the aspect ratio clamped to the range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        rows = torch.arange(n)
        pick = first.clamp(min=0)
        w, h = w[rows, pick], h[rows, pick]
        u = torch.rand(n, 2, generator=generator)
        top = torch.floor(u[:, 0] * (height - h + 1))
        left = torch.floor(u[:, 1] * (width - w + 1))
        fallback = first < 0
        w = torch.where(fallback, torch.full_like(w, fw), w)
        h = torch.where(fallback, torch.full_like(h, fh), h)
        top = torch.where(fallback, torch.full_like(top, (height - fh) // 2), top)
        left = torch.where(fallback, torch.full_like(left, (width - fw) // 2), left)
        return torch.stack([left, top, left + w, top + h], dim=1)

    def random_crops(self, source: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` random resized (and flipped) crops ``[n, 3, S, S]`` of ``source [3, H, W]`` in [0, 1]."""
        boxes = self.crop_boxes(source.shape[1], source.shape[2], n, generator)
        rois = torch.cat([torch.zeros(n, 1), boxes], dim=1)
        crops = roi_align(source.unsqueeze(0), rois, (self.size, self.size), 1.0, -1, True)
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        return crops


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def _sign(generator: torch.Generator | None) -> float:
    return 1.0 if _uniform(generator) < 0.5 else -1.0


def augmix_op(image: Tensor, op: str, generator: torch.Generator | None) -> Tensor:
    """One AugMix operation at severity 1 on a uint8 image ``[3, H, W]`` (AugMix's parameter ranges)."""
    level = _uniform(generator, 0.1, 1.0)  # AugMix's sample_level(severity=1)
    side = image.shape[-1]
    if op == "autocontrast":
        return TF.autocontrast(image)
    if op == "equalize":
        return TF.equalize(image)
    if op == "posterize":
        return TF.posterize(image, 4 - int(level * 4 / 10))
    if op == "solarize":
        return TF.solarize(image, 256 - int(level * 256 / 10))
    if op == "rotate":
        return TF.rotate(image, _sign(generator) * int(level * 30 / 10), InterpolationMode.BILINEAR)
    if op in ("shear_x", "shear_y"):
        angle = math.degrees(math.atan(_sign(generator) * level * 0.3 / 10))
        shear = [angle, 0.0] if op == "shear_x" else [0.0, angle]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, InterpolationMode.BILINEAR)
    if op in ("translate_x", "translate_y"):
        shift = _sign(generator) * int(level * side / 3 / 10)
        offset = [shift, 0] if op == "translate_x" else [0, shift]
        return TF.affine(image, 0.0, offset, 1.0, [0.0, 0.0], InterpolationMode.BILINEAR)
    raise ValueError(f"unknown AugMix operation {op!r}")


def augmix(crops: Tensor, generator: torch.Generator | None, width: int = 3, max_depth: int = 3) -> Tensor:
    """AugMix each crop ``[n, 3, S, S]`` (floats in [0, 1]): ``m * crop + (1 - m) * sum_i w_i chain_i(crop)``."""
    out = torch.empty_like(crops)
    for k, crop in enumerate(crops):
        # Dirichlet(1,1,1) and Beta(1,1) from the generator: normalised exponentials, and a uniform
        e = -torch.log(torch.rand(width, generator=generator).clamp_min(1e-12))
        weights = e / e.sum()
        m = _uniform(generator)
        pixels = TF.to_dtype(crop, torch.uint8, scale=True)
        mix = torch.zeros_like(crop)
        for i in range(width):
            aug = pixels
            depth = int(torch.randint(1, max_depth + 1, (), generator=generator))
            for _ in range(depth):
                op = AUGMIX_OPS[int(torch.randint(len(AUGMIX_OPS), (), generator=generator))]
                aug = augmix_op(aug, op, generator)
            mix += weights[i] * TF.to_dtype(aug, torch.float32, scale=True)
        out[k] = m * crop + (1 - m) * mix
    return out
