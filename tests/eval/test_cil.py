"""Class-incremental measures on a hand-made 3x3 accuracy matrix, computed by hand."""

from __future__ import annotations

import math

import numpy as np
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


def _cil_loops(r: list[list[float]]) -> tuple[float, float]:
    """FFM and CODA's forgetting written as the papers' loops over the seen part of ``R`` (i >= j)."""
    n = len(r)
    ffm_ref = sum(max(r[i][j] for i in range(j, n)) - r[n - 1][j] for j in range(n - 1)) / (n - 1)
    coda_ref = sum(sum(r[t - 1][j] - r[t][j] for j in range(t)) / t for t in range(1, n)) / (n - 1)
    return ffm_ref, coda_ref


def test_forgetting_measures_match_loops_on_partial_runs_with_two_to_five_sessions():
    """FFM and CODA forgetting over n sessions of a wider task list (m > n): the session count, not the task count,
    sets the last row and the averaging; two sessions already have forgetting; CODA divides step t by t."""
    rng = np.random.default_rng(3)
    for n in (2, 3, 5):
        m = n + 2  # the run stopped before the last two tasks
        r = rng.uniform(0, 100, (n, m)).round(1)
        r[np.triu_indices(n, 1, m)] = np.nan
        ffm_ref, coda_ref = _cil_loops(r.tolist())
        assert ffm(r) == pytest.approx(ffm_ref, abs=1e-9)
        assert forgetting_coda(r) == pytest.approx(coda_ref, abs=1e-9)


def test_two_sessions_hand_computed():
    """n = 2 is the smallest run with forgetting: FFM = max(R00, R10) - R10, CODA = R00 - R10."""
    r = [[90.0, None], [60.0, 40.0]]
    assert ffm(r) == pytest.approx(30.0)
    assert forgetting_coda(r) == pytest.approx(30.0)


def test_summary_default_prefix_is_cil_acc():
    assert set(summarize_cil(R)) == {f"cil/acc/{k}" for k in CIL_DEFINITIONS}
