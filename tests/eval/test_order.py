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
