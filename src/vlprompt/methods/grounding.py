"""Referring-expression comprehension (REC) on the OWL-ViT-style detector: the base of every grounding method, its
training loss, and the zero-shot detector.

A :class:`GroundingMethod` owns a :class:`~vlprompt.backbone.detector.Detector` (the backbone's towers plus OWL-ViT's
heads) and scores each image's patches against that image's expression under the method's prompt plans
(:meth:`Method.plans`), so a prompt method (LPI, S-Prompts, L2P, MaPLe, DCP for grounding) only supplies plans and
extra loss terms. The towers are frozen (as in every prompt method); the heads are frozen too unless the method
is built with ``train_heads=True`` (training a detector's heads).

**Loss** (DETR family, Carion et al. 2020; constants from DETR's ``main.py``, which MDETR and OWL-ViT's fine-tuning
keep): REC has exactly one target box per expression, so DETR's Hungarian matching reduces to choosing the single
patch of least matching cost

    cost[p] = -1 · softmax(logits)[p] + 5 · |b_p - b*|_1 + (-2) · GIoU(b_p, b*)      (set_cost_class/bbox/giou)

(``b`` normalised ``cxcywh``, the L1 over the four coordinates, GIoU on the corners); the match is not
differentiated. The class term makes the match follow the model's own score as it learns (the patch it will answer
with), the box terms anchor it to the target; a fixed geometric rule (e.g. the patch under the target's centre)
would ignore what the box head can reach from each patch. Then

    L = 1 · CE(logits over patches, matched patch) + 5 · |b_match - b*|_1 + 2 · (1 - GIoU(b_match, b*))

averaged over the batch (DETR's ``loss_ce``, ``bbox_loss_coef = 5``, ``giou_loss_coef = 2``). The classification
is a softmax over the image's patches, since exactly one patch answers an expression, and the answer at test time
is the argmax patch (:meth:`GroundingMethod.predict`). GIoU is ``eval.grounding.generalized_box_iou`` (differentiable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone import Backbone
from vlprompt.backbone.detector import Detector, DetectorOutput, rank_patches
from vlprompt.eval.grounding import clip_boxes, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.options import count, nonneg

#: A per-layer coupling of the two towers: ``(layer, x_vision, x_text) -> (x_vision, x_text)``.
Between = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class GroundingOptions:
    class_weight: float = nonneg(1.0)  # DETR loss_ce coefficient
    l1_weight: float = nonneg(5.0)  # DETR bbox_loss_coef
    giou_weight: float = nonneg(2.0)  # DETR giou_loss_coef
    match_class: float = nonneg(1.0)  # DETR set_cost_class
    match_l1: float = nonneg(5.0)  # DETR set_cost_bbox
    match_giou: float = nonneg(2.0)  # DETR set_cost_giou
    top_k: int = count(10)  # boxes kept per expression at evaluation (P@1/5/10 need 10)
    clip_boxes: bool = False  # clip predicted boxes to the image (MDETR's evaluation does not)
    objectness: bool = False  # build OWLv2's objectness head when the method builds new heads (REC does not use it)


@dataclass
class RecPrediction:
    """Top-k answers per expression, best first: ``boxes [B, k, 4]`` pixel ``xyxy`` (what
    ``eval.grounding.precision_at_k`` takes), ``scores [B, k]`` (class logits), ``patches [B, k]``."""

    boxes: Tensor
    scores: Tensor
    patches: Tensor
    tasks: Tensor | None = None  # the task whose prompts answered each expression (continual methods), else None


def normalized_targets(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Pixel ``xyxy`` target boxes ``[B, 4]`` of images ``sizes [B, 2]`` = ``(width, height)`` -> normalised
    ``cxcywh`` (the box head's format), for inputs that span the whole image (squashed, as OWL-ViT does)."""
    wh = sizes.to(boxes).repeat(1, 2)
    return xyxy_to_cxcywh(boxes / wh)


def matching_cost(
    logits: Tensor, boxes: Tensor, targets: Tensor, w_class: float = 1.0, w_l1: float = 5.0, w_giou: float = 2.0
) -> Tensor:
    """DETR's matching cost ``[B, P]`` of every patch (``logits [B, P]``, boxes ``[B, P, 4]``) for the expression's
    target (``targets [B, 4]``; boxes normalised ``cxcywh``): ``-w_class p + w_l1 L1 - w_giou GIoU``."""
    probs = logits.softmax(dim=-1)
    t = targets[:, None, :].expand_as(boxes)
    l1 = (boxes - t).abs().sum(-1)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(t), aligned=True)
    return -w_class * probs + w_l1 * l1 - w_giou * giou


def rec_loss(
    logits: Tensor, boxes: Tensor, targets: Tensor, options: GroundingOptions | None = None
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """``(loss, {"class", "l1", "giou"}, matched patch [B])`` of the module docstring's rule."""
    o = options or GroundingOptions()
    with torch.no_grad():
        matched = matching_cost(logits, boxes, targets, o.match_class, o.match_l1, o.match_giou).argmin(dim=-1)
    rows = torch.arange(len(matched), device=matched.device)
    chosen = boxes[rows, matched]
    terms = {
        "class": F.cross_entropy(logits, matched),
        "l1": (chosen - targets).abs().sum(-1).mean(),
        "giou": (1 - generalized_box_iou(cxcywh_to_xyxy(chosen), cxcywh_to_xyxy(targets), aligned=True)).mean(),
    }
    loss = o.class_weight * terms["class"] + o.l1_weight * terms["l1"] + o.giou_weight * terms["giou"]
    return loss, terms, matched


class GroundingMethod(Method):
    """Base of the REC methods: a detector on the frozen backbone, DETR's loss, top-k boxes at evaluation.

    Subclasses supply prompts through :meth:`plans` (none here) and may add loss terms by overriding
    :meth:`forward`. ``detector``: a ready detector (e.g. from :func:`vlprompt.backbone.owlvit.load_owlvit`)
    whose backbone must be ``backbone``; without one, new heads are built. ``train_heads``: whether the heads
    train (a detector's own training); prompt methods keep them frozen. A subclass's ``Options`` extends
    :class:`GroundingOptions`.
    """

    Options = GroundingOptions

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options)
        if detector is not None and detector.backbone is not backbone:
            raise ValueError("the detector must wrap the method's backbone (use GroundingMethod.from_detector)")
        self.detector = detector if detector is not None else Detector(backbone, objectness=self.options.objectness)
        for head in self.detector.heads():
            head.requires_grad_(train_heads)
        self.loss_terms: dict[str, float] = {}

    @classmethod
    def from_detector(cls, detector: Detector, options: Any = None, **kwargs: Any) -> GroundingMethod:
        """The method on a ready detector (its backbone and heads), e.g. an imported OWL-ViT checkpoint."""
        return cls(detector.backbone, options, detector=detector, **kwargs)

    def ground(
        self, images: Tensor, tokens: Tensor, plans: Plans | None = None, between: Between | None = None
    ) -> DetectorOutput:
        """Detector output for image ``i`` and its expression ``tokens[i]`` (``[B, L]``): logits ``[B, P, 1]``.

        ``between`` (a method's per-layer coupling of the two towers, e.g. LPI's interaction) runs the towers in
        lock-step (:meth:`Detector.forward_paired`); without it they run apart."""
        plans = plans if plans is not None else self.plans()
        if between is not None:
            return self.detector.forward_paired(images, tokens, plans.image, plans.text, between)
        return self.detector(images, tokens[:, None], plans.image, plans.text)

    def forward(self, images: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """REC loss of images ``[B, 3, H, W]``, their expressions' token ids ``[B, L]`` and target boxes ``[B, 4]``
        (normalised ``cxcywh`` of the model input, see :func:`normalized_targets`); terms in ``loss_terms``."""
        out = self.ground(images, tokens)
        loss, terms, _ = rec_loss(out.logits[..., 0], out.boxes, targets.to(out.boxes), self.options)
        self.loss_terms = {name: float(t.detach()) for name, t in terms.items()}
        return loss

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        expressions: Sequence[str] | Tensor,
        sizes: Tensor,
        k: int | None = None,
        plans: Plans | None = None,
        tasks: Tensor | None = None,
    ) -> RecPrediction:
        """The ``k`` (default ``top_k``) best boxes per expression, in pixels of images ``sizes [B, 2]`` =
        ``(width, height)``: the span the normalised coordinates cover (the original image for squashed inputs;
        the padded square for padded ones). ``boxes[:, 0]`` is the REC answer. ``tasks``: a continual method's true
        task per image (oracle routing); by default it routes (``RecPrediction.tasks``)."""
        tokens = expressions if isinstance(expressions, Tensor) else self.tokenize(expressions)
        if tokens.dim() != 2 or tokens.shape[0] != images.shape[0]:
            raise ValueError(
                f"predict takes one expression per image: {images.shape[0]} images, tokens {tuple(tokens.shape)}"
            )
        if sizes.reshape(-1, 2).shape[0] != images.shape[0]:
            raise ValueError(f"sizes must be [B, 2] (width, height) for {images.shape[0]} images")
        out, tasks = self.ground_eval(images, tokens, plans, tasks)
        top = rank_patches(out.logits[..., 0], out.boxes, k or self.options.top_k)
        wh = sizes.to(top.boxes).reshape(-1, 1, 2)
        boxes = cxcywh_to_xyxy(top.boxes) * wh.repeat(1, 1, 2)
        if self.options.clip_boxes:
            boxes = clip_boxes(boxes, wh[..., 0], wh[..., 1])
        return RecPrediction(boxes, top.scores, top.patches, tasks)

    def ground_eval(
        self, images: Tensor, tokens: Tensor, plans: Plans | None = None, tasks: Tensor | None = None
    ) -> tuple[DetectorOutput, Tensor | None]:
        """The detector output used at evaluation and the task each row used (None: no tasks); a continual method
        routes here (``tasks``: the true tasks, to evaluate with oracle routing)."""
        return self.ground(images, tokens, plans), None


@register_method("zeroshot_ground")
class ZeroShotGrounding(GroundingMethod):
    """The detector as it is (OWL-ViT zero-shot REC, LPI's zero-shot baseline): no prompts, nothing trains."""
