"""REC on the detector: DETR's matching and loss terms by hand, gradients only where they belong, predict in pixels,
the zero-shot method's registration, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone.detector import Detector
from vlprompt.methods import build_method, list_methods
from vlprompt.methods.base import Plans
from vlprompt.methods.grounding import (
    GroundingMethod,
    GroundingOptions,
    ZeroShotGrounding,
    matching_cost,
    normalized_targets,
    rec_loss,
)

TARGET = [0.5, 0.5, 0.2, 0.2]  # cxcywh; corners (0.4, 0.4, 0.6, 0.6)


def _tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _images(n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 64, 64)


def _softmax(*xs: float) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


# ---- matching and loss, by hand ----------------------------------------------------------------------------------
def test_defaults_are_detrs_constants():
    o = GroundingOptions()
    assert (o.class_weight, o.l1_weight, o.giou_weight) == (1.0, 5.0, 2.0)
    assert (o.match_class, o.match_l1, o.match_giou) == (1.0, 5.0, 2.0)
    assert o.top_k == 10


def test_matching_cost_by_hand():
    # patch 0 is the target; patch 1 is shifted by 0.1 in x: L1 0.1, IoU 0.02/0.06, hull 0.06 -> GIoU 1/3
    boxes = torch.tensor([[TARGET, [0.6, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[0.0, 2.0]])
    p0, p1 = _softmax(0.0, 2.0)
    cost = matching_cost(logits, boxes, torch.tensor([TARGET]))
    expected = [-p0 + 0.0 - 2 * 1.0, -p1 + 5 * 0.1 - 2 * (1 / 3)]
    torch.testing.assert_close(cost, torch.tensor([expected]), atol=1e-5, rtol=0)
    assert int(cost.argmin()) == 0  # the boxes decide by default ...
    heavy_class = matching_cost(logits, boxes, torch.tensor([TARGET]), w_class=10.0)
    assert int(heavy_class.argmin()) == 1  # ... a dominant class cost picks the higher-scoring patch
    l1_only = matching_cost(logits, boxes, torch.tensor([TARGET]), 0.0, 1.0, 0.0)
    torch.testing.assert_close(l1_only, torch.tensor([[0.0, 0.1]]), atol=1e-6, rtol=0)
    giou_only = matching_cost(logits, boxes, torch.tensor([TARGET]), 0.0, 0.0, 1.0)
    torch.testing.assert_close(giou_only, torch.tensor([[-1.0, -1 / 3]]), atol=1e-6, rtol=0)


def _loss_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Two expressions; the hand-computed terms of each (batch means)."""
    # row 0: patch 0 near the target (shift 0.05: L1 0.05, IoU 0.03/0.05 = 0.6, hull 0.05 -> GIoU 0.6);
    #        patch 1 far away (GIoU -0.8347, L1 1.0): matched patch 0 although patch 1 scores higher
    # row 1: patch 1 is the target exactly, patch 0 far: matched patch 1
    boxes = torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]], [[0.9, 0.9, 0.1, 0.1], TARGET]])
    logits = torch.tensor([[0.0, 1.0], [0.5, -0.5]])
    targets = torch.tensor([TARGET, TARGET])
    ce0, ce1 = -math.log(_softmax(0.0, 1.0)[0]), -math.log(_softmax(0.5, -0.5)[1])
    terms = {"class": (ce0 + ce1) / 2, "l1": (0.05 + 0.0) / 2, "giou": ((1 - 0.6) + 0.0) / 2}
    return logits, boxes, targets, terms


def test_rec_loss_terms_and_total_by_hand():
    logits, boxes, targets, expected = _loss_case()
    loss, terms, matched = rec_loss(logits, boxes, targets)
    assert matched.tolist() == [0, 1]
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-5), name
    total = 1.0 * expected["class"] + 5.0 * expected["l1"] + 2.0 * expected["giou"]
    assert loss.item() == pytest.approx(total, abs=1e-5)
    weighted = rec_loss(logits, boxes, targets, GroundingOptions(class_weight=0.5, l1_weight=3.0, giou_weight=7.0))[0]
    assert weighted.item() == pytest.approx(
        0.5 * expected["class"] + 3 * expected["l1"] + 7 * expected["giou"], abs=1e-5
    )


def test_loss_reaches_logits_and_boxes_with_finite_gradients():
    logits, boxes, targets, _ = _loss_case()
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    rec_loss(logits, boxes, targets)[0].backward()
    assert torch.isfinite(boxes.grad).all() and boxes.grad[0, 0].abs().sum() > 0  # GIoU + L1 through the match
    assert boxes.grad[0, 1].abs().sum() == 0  # unmatched boxes get no box loss
    assert logits.grad.abs().sum() > 0


def test_normalized_targets():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    out = normalized_targets(boxes, torch.tensor([[100, 200]]))
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.2, 0.4, 0.2]]))


# ---- the method ----------------------------------------------------------------------------------------------------
class _PromptedGrounding(GroundingMethod):
    """A minimal prompt method: one learned visual token inserted after CLS (what later methods' plans do)."""

    def __init__(self, backbone, options=None, **kwargs) -> None:
        super().__init__(backbone, options, **kwargs)
        self.token = torch.nn.Parameter(0.02 * torch.randn(2, backbone.vision_width))

    def plans(self) -> Plans:
        return Plans(image=PromptPlan(insert=self.token))


def _step(method: GroundingMethod) -> torch.Tensor:
    tokens = method.tokenize(["the red star", "a blue circle"])
    loss = method(_images(), tokens, torch.tensor([TARGET, [0.3, 0.7, 0.2, 0.4]]))
    loss.backward()
    return loss


def test_zero_shot_is_registered_and_trains_nothing():
    assert "zeroshot_ground" in list_methods()
    method = build_method({"name": "zeroshot_ground"}, _tiny())
    assert isinstance(method, ZeroShotGrounding)
    assert method.parameter_counts()["trainable"] == 0 and method.trainable_parameters() == []
    loss = method(_images(), method.tokenize(["a", "b"]), torch.tensor([TARGET, TARGET]))
    assert torch.isfinite(loss) and set(method.loss_terms) == {"class", "l1", "giou"}


def test_prompts_train_and_the_towers_and_heads_do_not():
    method = _PromptedGrounding(_tiny())
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["token"]
    _step(method)
    assert method.token.grad is not None and method.token.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in method.named_parameters() if n != "token")


def test_train_heads_trains_the_heads_only():
    method = GroundingMethod(_tiny(), train_heads=True)
    _step(method)
    heads = {id(p) for h in method.detector.heads() for p in h.parameters()}
    for name, p in method.named_parameters():
        if id(p) in heads:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert method.detector.class_head.dense0.weight.grad.abs().sum() > 0


def test_predict_gives_pixel_xyxy_boxes_best_first():
    method = GroundingMethod(_tiny())
    head = method.detector
    torch.nn.init.zeros_(head.box_head.dense2.weight)  # boxes = the patch prior
    torch.nn.init.zeros_(head.box_head.dense2.bias)
    torch.nn.init.zeros_(head.class_head.dense0.weight)  # equal logits everywhere: ties -> lower patch first
    torch.nn.init.zeros_(head.class_head.dense0.bias)
    torch.nn.init.zeros_(head.class_head.logit_shift.weight)
    torch.nn.init.zeros_(head.class_head.logit_scale.weight)
    sizes = torch.tensor([[640, 480], [80, 160]])
    pred = method.predict(_images(), ["x", "y"], sizes, k=5)
    assert pred.boxes.shape == (2, 5, 4) and pred.patches.tolist() == [[0, 1, 2, 3, 4]] * 2
    # patch 1 (row 0, column 1) of the 8x8 grid: centre (2/8, 1/8), size (1/8, 1/8) of the image
    cx, cy, w, h = 2 / 8 * 640, 1 / 8 * 480, 640 / 8, 480 / 8
    expected = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    torch.testing.assert_close(pred.boxes[0, 1], expected, atol=0.1, rtol=0)
    assert pred.boxes[1, 0, 2].item() == pytest.approx(80 * (1 / 8 + 1 / 16), abs=0.02)
    assert method.predict(_images(), ["x", "y"], sizes).boxes.shape[1] == 10  # top_k by default


def test_predict_clips_when_asked():
    method = GroundingMethod(_tiny(), GroundingOptions(clip_boxes=True))
    pred = method.predict(_images(), ["x", "y"], torch.tensor([[50, 40], [30, 20]]), k=64)
    assert bool((pred.boxes >= 0).all())
    assert bool((pred.boxes[0, :, 0::2] <= 50).all() and (pred.boxes[0, :, 1::2] <= 40).all())
    unclipped = GroundingMethod(method.backbone).predict(
        _images(), ["x", "y"], torch.tensor([[50, 40], [30, 20]]), k=64
    )
    assert bool((unclipped.boxes[0, :, 2] > 50).any())  # the right-most patches' prior boxes leave the image


def test_clear_errors():
    backbone = _tiny()
    method = GroundingMethod(backbone)
    with pytest.raises(ValueError, match="sizes must be"):
        method.predict(_images(), ["x", "y"], torch.tensor([[10, 10]]))
    with pytest.raises(ValueError, match="takes 64x64 images"):
        method(torch.zeros(2, 3, 32, 32), method.tokenize(["a", "b"]), torch.tensor([TARGET, TARGET]))
    with pytest.raises(ValueError, match="must wrap the method's backbone"):
        GroundingMethod(backbone, detector=Detector(_tiny()))
    detector = Detector(backbone)
    assert GroundingMethod.from_detector(detector).detector is detector
