"""Order sensitivity: can a model tell a video from its time reversal?

For every pair ``(a, b)`` of videos that are time reversals of each other and every caption ``c`` of ``a``
(and of ``b``), the caption scores its own video above the reversed one (1), ties (1/2) or below (0).
A model that pools frames without order information ties on every pair and scores exactly 50. Scores within
``tie_tol`` count as ties, since pooling the same frames in another order differs only by float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reversed_pair_accuracy(
    text_feats: Tensor,
    video_feats: Tensor,
    txt2vid: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    tie_tol: float = 1e-5,
) -> float:
    """Percentage of (caption, reversed twin) comparisons won by the caption's own video; ties count half."""
    txt2vid_t = torch.as_tensor(list(txt2vid))
    twin = {}
    for a, b in pairs:
        twin[a], twin[b] = b, a
    rows = [i for i, v in enumerate(txt2vid_t.tolist()) if v in twin]
    if not rows:
        raise ValueError("no caption belongs to a video of a reversed pair")
    own = txt2vid_t[rows]
    other = torch.tensor([twin[int(v)] for v in own])
    t = text_feats[rows].double()
    s_own = (t * video_feats[own].double()).sum(-1)
    s_other = (t * video_feats[other].double()).sum(-1)
    tie = (s_own - s_other).abs() <= tie_tol
    score = torch.where(tie, 0.5, (s_own > s_other).double())
    return round(100.0 * float(score.mean()), 4)
