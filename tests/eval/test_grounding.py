"""REC box utilities and Precision@K on hand-made boxes, and against a loop version of MDETR's evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlprompt.eval.grounding import (
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    generalized_box_iou,
    precision_at_k,
    precision_per_task,
    rec_hits,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)

T = torch.tensor
F64 = torch.float64
GT = [0.0, 0.0, 10.0, 10.0]
MISS = [20.0, 20.0, 30.0, 30.0]  # disjoint from GT


def test_format_conversions():
    xywh = T([[1.0, 2.0, 3.0, 4.0]])
    assert xywh_to_xyxy(xywh).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert xyxy_to_xywh(xywh_to_xyxy(xywh)).tolist() == xywh.tolist()
    assert cxcywh_to_xyxy(T([[5.0, 5.0, 4.0, 2.0]])).tolist() == [[3.0, 4.0, 7.0, 6.0]]
    assert xyxy_to_cxcywh(T([[3.0, 4.0, 7.0, 6.0]])).tolist() == [[5.0, 5.0, 4.0, 2.0]]
    assert box_area(T([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]])).tolist() == [6.0, 0.0]  # inverted: 0


def test_pairwise_and_aligned_overlaps():
    a = T([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=F64)
    b = T([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0]], dtype=F64)
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    expected_iou = [[2 / 6, 1.0, 0.0], [0.0, 1 / 4, 0.0]]
    for i, row in enumerate(expected_iou):
        assert iou[i].tolist() == pytest.approx(row)
    giou = generalized_box_iou(a, b)
    # [0,0,1,1] vs [2,0,3,1]: IoU 0, union 2, hull 3 -> -1/3; [0,0,2,2] vs [1,0,3,2]: hull = union -> IoU
    assert giou[1, 2].item() == pytest.approx(-1 / 3)
    assert giou[0, 0].item() == pytest.approx(2 / 6)
    aligned = generalized_box_iou(a, b[:2], aligned=True)
    assert aligned.tolist() == pytest.approx([giou[0, 0].item(), giou[1, 1].item()])
    with pytest.raises(ValueError, match=r"\[N, 4\] and \[M, 4\]"):
        box_iou(a[None], b)


def test_degenerate_boxes_give_zero_not_nan_and_finite_gradients():
    point = T([[3.0, 3.0, 3.0, 3.0]], dtype=F64, requires_grad=True)
    line = T([[3.0, 0.0, 3.0, 10.0]], dtype=F64)
    for other in (point.detach(), line, T([GT], dtype=F64)):
        assert box_iou(point, other).item() == 0.0
        assert generalized_box_iou(point, other).item() == 0.0  # a zero-area box inside: no hull penalty either
    generalized_box_iou(point, point.detach().clone(), aligned=True).sum().backward()
    assert torch.isfinite(point.grad).all()


def test_clip_boxes_to_the_image():
    boxes = T([[-5.0, 2.0, 8.0, 30.0], [12.0, 12.0, 15.0, 18.0], [1.0, 1.0, 2.0, 2.0]])
    clipped = clip_boxes(boxes, 10, 20)
    assert clipped.tolist() == [[0.0, 2.0, 8.0, 20.0], [10.0, 12.0, 10.0, 18.0], [1.0, 1.0, 2.0, 2.0]]
    assert box_area(clipped)[1].item() == 0.0  # wholly outside: zero area on the border
    per_image = clip_boxes(boxes[:2], T([4.0, 20.0]), T([20.0, 16.0]))  # one size per box
    assert per_image.tolist() == [[0.0, 2.0, 4.0, 20.0], [12.0, 12.0, 15.0, 16.0]]


def test_exact_threshold_counts_as_a_hit():
    gt = [[0.0, 0.0, 2.0, 1.0]]
    exact = [[[0.0, 0.0, 1.0, 1.0]]]  # IoU = GIoU = 1/2 exactly (hull = target)
    below = [[[0.0, 0.0, 0.999, 1.0]]]
    assert precision_at_k(exact, gt, ks=(1,)) == {"rec/P@1": 100.0}
    assert precision_at_k(below, gt, ks=(1,)) == {"rec/P@1": 0.0}
    assert precision_at_k(exact, gt, ks=(1,), threshold=0.5 + 1e-9) == {"rec/P@1": 0.0}


def test_giou_rule_is_stricter_than_iou():
    # shifted diagonally by 1.8: IoU = 67.24/132.76 = 0.5065, GIoU = 0.5065 - 6.48/139.24 = 0.4600
    pred = [[[1.8, 1.8, 11.8, 11.8]]]
    assert box_iou(T(pred[0], dtype=F64), T([GT], dtype=F64)).item() == pytest.approx(0.50648, abs=1e-4)
    assert precision_at_k(pred, [GT], ks=(1,), overlap="iou") == {"rec/P@1": 100.0}
    assert precision_at_k(pred, [GT], ks=(1,)) == {"rec/P@1": 0.0}  # the default: MDETR's GIoU
    assert rec_hits(pred, [GT], ks=(1,)).tolist() == [[False]]


def test_rank_of_the_first_good_box_decides_each_k():
    good = GT
    preds = [
        [good] + [MISS] * 9,  # rank 1
        [MISS] * 3 + [good] + [MISS] * 6,  # rank 4
        [MISS] * 6 + [good] + [MISS] * 3,  # rank 7
        [MISS] * 10,  # never
    ]
    hits = rec_hits(preds, [GT] * 4)
    assert hits.tolist() == [[True, True, True], [False, True, True], [False, False, True], [False, False, False]]
    assert precision_at_k(preds, [GT] * 4) == {"rec/P@1": 25.0, "rec/P@5": 50.0, "rec/P@10": 75.0}


def test_boxes_beyond_k_never_count():
    preds = [[MISS] * 10 + [GT]]  # an 11th box is good: outside P@10
    assert precision_at_k(preds, [GT]) == {"rec/P@1": 0.0, "rec/P@5": 0.0, "rec/P@10": 0.0}


def test_fewer_predictions_than_k_and_none():
    ragged = [[MISS, GT], [], [GT]]  # 2 boxes, no box, 1 box
    assert rec_hits(ragged, [GT] * 3).tolist() == [[False, True, True], [False, False, False], [True, True, True]]
    three = torch.tensor([[MISS, MISS, GT]])  # a [N, 3, 4] tensor against K = 5, 10
    assert precision_at_k(three, [GT]) == {"rec/P@1": 0.0, "rec/P@5": 100.0, "rec/P@10": 100.0}
    assert precision_at_k(torch.zeros(2, 0, 4), [GT, GT]) == {"rec/P@1": 0.0, "rec/P@5": 0.0, "rec/P@10": 0.0}
    # padding never counts, whatever the threshold: a real box with IoU 0 hits at threshold 0, no box does not
    assert rec_hits([[MISS], []], [GT, GT], ks=(1,), threshold=0.0, overlap="iou").tolist() == [[True], [False]]


def test_boxes_outside_the_image_are_compared_as_given():
    # image 10 x 10; the target touches the left border; a prediction spilling out to the left
    gt = [[0.0, 0.0, 4.0, 10.0]]
    spill = torch.tensor([[[-6.0, 0.0, 4.0, 10.0]]])  # IoU 40/100
    assert precision_at_k(spill, gt, ks=(1,)) == {"rec/P@1": 0.0}
    assert precision_at_k(clip_boxes(spill, 10, 10), gt, ks=(1,)) == {"rec/P@1": 100.0}
    outside = torch.tensor([[[12.0, 0.0, 16.0, 10.0]]])
    assert precision_at_k(outside, gt, ks=(1,)) == {"rec/P@1": 0.0}
    assert precision_at_k(clip_boxes(outside, 10, 10), gt, ks=(1,)) == {"rec/P@1": 0.0}


def test_a_zero_area_target_is_never_hit():
    line = [[3.0, 0.0, 3.0, 10.0]]
    assert precision_at_k([[line[0], GT]], line, overlap="iou") == {"rec/P@1": 0.0, "rec/P@5": 0.0, "rec/P@10": 0.0}


def test_percent_over_expressions_and_per_task():
    preds = [[GT], [MISS], [GT], [GT]]
    tasks = [0, 0, 3, 0]
    overall = precision_at_k(preds, [GT] * 4, ks=(1,), prefix="rec")
    assert overall == {"rec/P@1": 75.0}  # pooled over expressions (MDETR's per-dataset number)
    per_task = precision_per_task(preds, [GT] * 4, tasks, ks=(1,))
    assert per_task.keys() == {0, 3}
    assert per_task[0]["rec/P@1"] == pytest.approx(200 / 3)
    assert per_task[3] == {"rec/P@1": 100.0}
    assert precision_per_task(preds, [GT] * 4, torch.tensor(tasks), ks=(1,)) == per_task


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (6, 10, 2))
    preds = np.concatenate([xy, xy + rng.uniform(1, 30, (6, 10, 2))], axis=-1)
    gt = preds[:, 3] + 0.5
    assert precision_at_k(preds, gt) == precision_at_k(torch.from_numpy(preds), torch.from_numpy(gt))
    assert precision_at_k(list(preds), gt.tolist()) == precision_at_k(preds, gt)  # a list of [K, 4] arrays


def _giou_loop(p: list[float], g: list[float]) -> float:
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    return inter / union - (hull - union) / hull


def test_matches_a_loop_version_of_mdetrs_evaluator():
    rng = np.random.default_rng(1)
    gt = np.concatenate([rng.uniform(0, 40, (200, 2)), np.zeros((200, 2))], axis=1)
    gt[:, 2:] = gt[:, :2] + rng.uniform(5, 30, (200, 2))
    preds = gt[:, None, :] + rng.normal(0, 4, (200, 12, 4))
    preds[..., 2:] = np.maximum(preds[..., 2:], preds[..., :2] + 0.5)
    expected = {}
    for k in (1, 5, 10):
        hit = [max(_giou_loop(list(preds[i, j]), list(gt[i])) for j in range(k)) >= 0.5 for i in range(200)]
        expected[f"rec/P@{k}"] = 100.0 * sum(hit) / 200
    got = precision_at_k(preds, gt)
    assert got == pytest.approx(expected)
    assert 0 < got["rec/P@1"] < got["rec/P@10"] < 100  # the data exercise every outcome


@pytest.mark.parametrize(
    ("preds", "gt", "kwargs", "match"),
    [
        ([[[5.0, 0.0, 1.0, 1.0]]], [GT], {}, "x2 >= x1"),
        ([[[0.0, 0.0, float("nan"), 1.0]]], [GT], {}, "non-finite"),
        ([[GT]], [GT, GT], {}, "1 prediction lists for 2"),
        ([[GT]], [GT], {"ks": (0, 5)}, "positive integers"),
        ([[GT]], [GT], {"overlap": "dice"}, "overlap"),
        ([[GT]], [GT], {"threshold": float("nan")}, "threshold"),
        ([[[0.0, 0.0, 1.0]]], [GT], {}, r"\[K, 4\]"),
        ([], [], {}, "no expression"),
    ],
)
def test_bad_inputs_are_clear_errors(preds, gt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        precision_at_k(preds, gt, **kwargs)


def test_tasks_must_match_the_expressions():
    with pytest.raises(ValueError, match="one per expression"):
        precision_per_task([[GT], [GT]], [GT, GT], [0])
