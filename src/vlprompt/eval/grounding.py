"""Referring-expression comprehension (REC): box utilities and Precision@K.

Boxes are ``[..., 4]`` tensors in pixels, ``xyxy`` (corners: x1, y1, x2, y2) unless a name says otherwise;
COCO annotations store ``xywh`` (top-left corner, width, height), box heads of the DETR/OWL-ViT family predict
``cxcywh`` (centre, width, height). The overlap functions are differentiable and keep the input's dtype, so a
GIoU box loss can use them; the metric validates its inputs and computes in float64.

**Precision@K** (MDETR's ``RefExpEvaluator`` in ``datasets/refexp.py``, copied unchanged by GLIP and by LPI's
grounding code, spec ``lpi.md`` section 6):

* each expression has one target box and a list of predicted boxes ranked best first (MDETR sorts by score);
* it is a **hit at K** when at least one of its first K predictions has **GIoU >= 0.5** with the target
  (``>=``: exactly 0.5 counts). With fewer than K predictions all of them are considered (``giou[:k]``), and an
  expression without any prediction is a miss (LPI's evaluator counts it as one; MDETR's would crash);
* ``P@K = 100 * hits / expressions`` over the expressions of one task (LPI's per-task numbers, which fill the
  continual accuracy matrices) or of a whole split (MDETR's per-dataset numbers, pooled over expressions).

GIoU <= IoU, so GIoU >= 0.5 is slightly stricter than the "Acc@0.5" (IoU >= 0.5) most REC papers report;
``overlap="iou"`` gives that. Predicted boxes are compared as given: the metric does not clip them to the image
(MDETR's post-processing does not either); :func:`clip_boxes` is there for a model that wants to.

Degenerate boxes: two boxes whose union has zero area have IoU 0 (not 0/0), and GIoU's enclosing-box penalty is 0
when the enclosing box has zero area. A zero-area target therefore can never be hit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Overlap = Literal["giou", "iou"]
OVERLAPS: tuple[str, ...] = ("giou", "iou")
#: The ranks MDETR, GLIP and LPI report.
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


# ---- box formats --------------------------------------------------------------------------------------------------
def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(x, y, w, h)`` (COCO) -> ``(x1, y1, x2, y2)``."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(x, y, w, h)`` (COCO)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` (DETR/OWL-ViT box heads) -> ``(x1, y1, x2, y2)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes; an inverted side (x2 < x1) counts as zero length."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def clip_boxes(boxes: Tensor, width: Any, height: Any) -> Tensor:
    """Clip ``xyxy`` boxes to the image ``[0, width] x [0, height]`` (scalars, or tensors broadcasting against the
    leading dimensions of ``boxes``). A box wholly outside becomes a zero-area box on the border."""
    w = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    h = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (torch.clamp(x1, zero, w), torch.clamp(y1, zero, h), torch.clamp(x2, zero, w), torch.clamp(y2, zero, h)),
        dim=-1,
    )


# ---- overlaps -----------------------------------------------------------------------------------------------------
def _pair(a: Tensor, b: Tensor, aligned: bool) -> tuple[Tensor, Tensor]:
    if aligned:
        return a, b
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"pairwise overlaps need boxes [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}")
    return a[:, None, :], b[None, :, :]


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    # A zero denominator gives 0, and the masked branch never divides by zero, so gradients stay finite too.
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _iou_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return _safe_ratio(inter, union), union


def box_iou(a: Tensor, b: Tensor, aligned: bool = False) -> Tensor:
    """IoU of ``xyxy`` boxes: ``[N, 4] x [M, 4] -> [N, M]``, or with ``aligned`` element by element
    (``[..., 4] x [..., 4] -> [...]``, broadcasting). Zero union area gives 0."""
    iou, _ = _iou_union(*_pair(a, b, aligned))
    return iou


def generalized_box_iou(a: Tensor, b: Tensor, aligned: bool = False) -> Tensor:
    """GIoU (Rezatofighi et al. 2019) of ``xyxy`` boxes, in ``[-1, 1]``: ``IoU - (C - U) / C`` with ``C`` the area
    of the smallest enclosing box and ``U`` the union. Shapes as :func:`box_iou`; zero ``C`` gives no penalty."""
    a, b = _pair(a, b, aligned)
    iou, union = _iou_union(a, b)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - _safe_ratio(hull - union, hull)


# ---- Precision@K --------------------------------------------------------------------------------------------------
def _as_boxes(x: Any, what: str, shape: str) -> Tensor:
    """``x`` as a validated float64 CPU tensor of ``shape`` (``"[N, 4]"``, ``"[N, K, 4]"``; empty lists allowed)."""
    ndim = shape.count(",") + 1
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    t = t.to(torch.float64)
    if t.numel() == 0 and ndim == 2:
        t = t.reshape(0, 4)  # an expression without predictions
    if t.ndim != ndim or t.shape[-1] != 4:
        raise ValueError(f"{what} must be {shape} boxes, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} hold a non-finite coordinate")
    if bool(((t[..., 2] < t[..., 0]) | (t[..., 3] < t[..., 1])).any()):
        raise ValueError(f"{what} must be xyxy with x2 >= x1 and y2 >= y1 (convert xywh/cxcywh boxes first)")
    return t


def _predictions(pred_boxes: Any, n: int) -> tuple[Tensor, Tensor]:
    """Predictions padded to ``[N, K_max, 4]`` float64 and a ``[N, K_max]`` mask of the real ones, from
    ``[N, K, 4]`` or from a sequence of ``N`` ``[K_i, 4]``."""
    if isinstance(pred_boxes, Tensor | np.ndarray):
        boxes = _as_boxes(pred_boxes, "pred_boxes", "[N, K, 4]")
        valid = torch.ones(boxes.shape[:2], dtype=torch.bool)
    elif isinstance(pred_boxes, Sequence):
        rows = [_as_boxes(p, f"pred_boxes[{i}]", "[K, 4]") for i, p in enumerate(pred_boxes)]
        k_max = max((len(r) for r in rows), default=0)
        boxes = torch.zeros(len(rows), k_max, 4, dtype=torch.float64)
        valid = torch.zeros(len(rows), k_max, dtype=torch.bool)
        for i, r in enumerate(rows):
            boxes[i, : len(r)], valid[i, : len(r)] = r, True
    else:
        raise ValueError(f"pred_boxes must be a tensor, an array or a list of [K, 4] boxes, got {type(pred_boxes)}")
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} prediction lists for {n} target boxes")
    return boxes, valid


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def rec_hits(
    pred_boxes: Any,
    gt_boxes: Any,
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = 0.5,
    overlap: Overlap = "giou",
) -> np.ndarray:
    """``[N, len(ks)]`` booleans: whether any of expression ``i``'s first ``ks[j]`` predictions reaches
    ``overlap >= threshold`` with its target (the module's definition).

    ``pred_boxes``: ``[N, K, 4]`` xyxy, ranked best first, or a sequence of ``N`` ``[K_i, 4]`` lists (``K_i`` may
    be 0); ``gt_boxes``: ``[N, 4]`` xyxy. Inverted or non-finite boxes are a ValueError.
    """
    ks = _check_ks(ks)
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    gt = _as_boxes(gt_boxes, "gt_boxes", "[N, 4]")
    measure = generalized_box_iou if overlap == "giou" else box_iou
    boxes, valid = _predictions(pred_boxes, len(gt))
    good = ((measure(boxes, gt[:, None, :].expand_as(boxes), aligned=True) >= threshold) & valid).numpy()
    if good.shape[1] == 0:
        return np.zeros((len(gt), len(ks)), dtype=bool)  # no expression has any prediction
    # a hit at k <=> the first good prediction is among the first k (fewer than k predictions: all of them count);
    # an expression without a good prediction never hits
    first_good = np.where(good.any(axis=1), good.argmax(axis=1), np.iinfo(np.int64).max)
    return first_good[:, None] < np.asarray(ks)[None, :]


def _precision(hits: np.ndarray, ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    return {f"{prefix}/P@{k}": 100.0 * float(hits[:, j].mean()) for j, k in enumerate(ks)}


def precision_at_k(
    pred_boxes: Any,
    gt_boxes: Any,
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = 0.5,
    overlap: Overlap = "giou",
    prefix: str = "rec",
) -> dict[str, float]:
    """Precision@K in percent over all expressions: ``{"rec/P@1": ..., "rec/P@5": ..., "rec/P@10": ...}``.

    MDETR's per-dataset numbers (see the module docstring for the hit rule; inputs as :func:`rec_hits`).
    No expression at all is a ValueError (the reference divides by zero).
    """
    ks = _check_ks(ks)
    hits = rec_hits(pred_boxes, gt_boxes, ks, threshold, overlap)
    if not len(hits):
        raise ValueError("Precision@K of no expression is undefined")
    return _precision(hits, ks, prefix)


def precision_per_task(
    pred_boxes: Any,
    gt_boxes: Any,
    tasks: Any,
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = 0.5,
    overlap: Overlap = "giou",
    prefix: str = "rec",
) -> dict[int, dict[str, float]]:
    """Precision@K in percent per task, ``{task: {"rec/P@1": ...}}`` for every task present in ``tasks``
    (``[N]`` integers, one per expression): LPI's per-task numbers, each over that task's expressions only."""
    ks = _check_ks(ks)
    hits = rec_hits(pred_boxes, gt_boxes, ks, threshold, overlap)
    task_of = np.asarray(tasks.detach().cpu() if isinstance(tasks, Tensor) else tasks)
    if task_of.shape != (len(hits),) or (len(hits) and task_of.dtype.kind not in "iu"):
        raise ValueError(f"tasks must be {len(hits)} integers (one per expression), got shape {task_of.shape}")
    return {int(t): _precision(hits[task_of == t], ks, prefix) for t in np.unique(task_of)}
