"""TTA views: the centre view is the evaluation preprocessing, crops follow RandomResizedCrop, all seeded."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from vlprompt.data.views import AUGMIX_OPS, TTAViews, augmix_op

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _image(w: int = 90, h: int = 70) -> Image.Image:
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_shapes_and_centre_view_is_the_evaluation_transform() -> None:
    views = TTAViews(32, 16, MEAN, STD)(_image(), torch.Generator().manual_seed(0))
    assert views.shape == (16, 3, 32, 32) and views.dtype == torch.float32
    reference = T.Compose([T.Resize(32, T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(MEAN, STD)])(_image())  # fmt: skip
    assert torch.allclose(views[0], reference, atol=1e-5)


def test_views_are_a_function_of_the_seed() -> None:
    make = TTAViews(32, 8, MEAN, STD)
    a = make(_image(), torch.Generator().manual_seed(3))
    b = make(_image(), torch.Generator().manual_seed(3))
    c = make(_image(), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a[1:], c[1:]) and torch.equal(a[0], c[0])


def test_crop_boxes_follow_random_resized_crop() -> None:
    make = TTAViews(32, 2, MEAN, STD)
    boxes = make.crop_boxes(70, 90, 500, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 70).all()
    area = w * h / (70 * 90)
    assert area.min() > 0.05 and area.max() <= 1.0
    ratio = (w / h).log()
    assert ratio.min() > math.log(3 / 4) - 0.1 and ratio.max() < math.log(4 / 3) + 0.1  # rounding slack
    assert len(set(map(tuple, boxes.tolist()))) > 400  # really random


def test_full_image_box_reproduces_a_plain_resize() -> None:
    make = TTAViews(16, 2, MEAN, STD, flip=False)
    source = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    make.crop_boxes = lambda h, w, n, g: torch.tensor([[0.0, 0.0, w, h]] * n)  # type: ignore[method-assign]
    crop = make.random_crops(source, 1, None)[0]
    pooled = torch.nn.functional.avg_pool2d(source.unsqueeze(0), 2)[0]  # 2x2 area average = adaptive sampling
    assert torch.allclose(crop, pooled, atol=1e-5)


@pytest.mark.parametrize("op", AUGMIX_OPS)
def test_augmix_operations_keep_shape_and_dtype(op: str) -> None:
    image = (torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    out = augmix_op(image, op, torch.Generator().manual_seed(0))
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_augmix_views_differ_from_plain_crops_and_stay_in_range() -> None:
    plain = TTAViews(32, 6, MEAN, STD)(_image(), torch.Generator().manual_seed(5))
    mixed = TTAViews(32, 6, MEAN, STD, augmix=True)(_image(), torch.Generator().manual_seed(5))
    assert torch.equal(plain[0], mixed[0]) and not torch.equal(plain[1:], mixed[1:])
    pixels = mixed * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_large_images_are_shrunk_before_cropping() -> None:
    views = TTAViews(16, 4, MEAN, STD)(_image(400, 300), torch.Generator().manual_seed(0))
    assert views.shape == (4, 3, 16, 16) and torch.isfinite(views).all()
