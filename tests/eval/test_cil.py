"""Class-incremental measures on a hand-made 3x3 accuracy matrix, computed by hand."""

from __future__ import annotations

import math

import pytest

from vlprompt.eval.cil import CIL_DEFINITIONS, caa, faa, ffm, forgetting_coda, summarize_cil
from vlprompt.eval.continual import forgetting_max_minus_last

# R[i][j]: task j after session i. Task 1 ends at its best (70 > 60), which separates FFM from max-minus-last.
R = [[90.0, None, None], [80.0, 60.0, None], [70.0, 70.0, 50.0]]


def test_measures_match_hand_computed_values():
    assert faa(R) == pytest.approx((70 + 70 + 50) / 3)  # 63.33
    assert caa(R) == pytest.approx((90 + (80 + 60) / 2 + (70 + 70 + 50) / 3) / 3)  # (90 + 70 + 63.33) / 3
    # FFM (max over every session, the last included): task 0: 90 - 70 = 20; task 1: max(60, 70) - 70 = 0
    assert ffm(R) == pytest.approx((20 + 0) / 2)
    # max-minus-last (max over sessions before the last): task 1: 60 - 70 = -10
    assert forgetting_max_minus_last(R) == pytest.approx((20 - 10) / 2)
    # CODA: t=1: (90-80)/1 = 10; t=2: ((80-70) + (60-70))/2 = 0; divided by n-1 = 2
    assert forgetting_coda(R) == pytest.approx((10 + 0) / 2)


def test_single_session_and_summary_keys():
    one = [[42.0]]
    assert faa(one) == caa(one) == 42.0
    assert math.isnan(ffm(one)) and math.isnan(forgetting_coda(one))
    summary = summarize_cil(R, "cil/acc")
    assert set(summary) == {f"cil/acc/{k}" for k in CIL_DEFINITIONS}
    with pytest.raises(ValueError, match="missing"):
        faa([[1.0, None], [None, 2.0]])
