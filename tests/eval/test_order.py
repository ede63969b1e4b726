"""Order sensitivity metric: frame-order-blind features tie on every reversed pair and score exactly 50."""

from __future__ import annotations

import pytest
import torch

from vlprompt.eval.order import reversed_pair_accuracy


def test_hand_made_pairs() -> None:
    videos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.2, 0.9], [0.0, 1.0], [1.0, 0.0]])
    txt2vid = [0, 1, 2, 3]
    # pair (0,1): both captions prefer their own video; pair (2,3): identical videos tie twice
    assert reversed_pair_accuracy(texts, videos, txt2vid, [(0, 1), (2, 3)]) == 75.0
    assert reversed_pair_accuracy(texts, videos, txt2vid, [(0, 1)]) == 100.0


def test_no_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="reversed pair"):
        reversed_pair_accuracy(torch.ones(2, 2), torch.ones(2, 2), [0, 1], [])


def test_ties_within_tolerance_are_inclusive_and_the_score_keeps_four_decimals() -> None:
    """A score difference of exactly ``tie_tol`` is a tie (half a point); the percentage is rounded to 4 decimals."""
    videos = torch.tensor([[1.0, 0.0], [0.75, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    txt2vid = [0, 1, 2, 3, 4, 5]
    # caption 0: 1.0 vs 0.75, a difference of exactly 0.25 (binary-exact) -> tie; captions 1, 3, 5: zero text ->
    # ties; caption 2: 1 vs 0 -> win; caption 4: 0 vs 1 -> loss: (0.5 + 0.5 + 1 + 0.5 + 0 + 0.5) / 6 = 50
    assert reversed_pair_accuracy(texts, videos, txt2vid, [(0, 1), (2, 3), (4, 5)], tie_tol=0.25) == 50.0
    # a smaller tolerance turns caption 0's tie into a win: 3.5 / 6 = 58.33333... -> 58.3333
    assert reversed_pair_accuracy(texts, videos, txt2vid, [(0, 1), (2, 3), (4, 5)], tie_tol=0.125) == 58.3333
