"""Continual metrics on hand-made accuracy matrices, cross-checked against loop implementations of LPI's script."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlprompt.eval.continual import (
    DEFINITIONS,
    MEASURES,
    as_matrix,
    average_incremental,
    average_over_time,
    backward_transfer,
    final_average,
    forgetting_lpi,
    forgetting_max_minus_last,
    summarize,
    summarize_matrices,
)

NAN = math.nan
# Task 0 peaks after session 1 (85), not when learned (80): forgetting and BWT then differ.
R = [
    [80.0, NAN, NAN],
    [85.0, 70.0, NAN],
    [50.0, 65.0, 90.0],
]


def test_hand_computed_values():
    assert final_average(R) == pytest.approx((50 + 65 + 90) / 3)
    assert average_over_time(R) == pytest.approx(((80 + 85 + 50) / 3 + (70 + 65) / 2 + 90) / 3)
    assert average_incremental(R) == pytest.approx((80 + (85 + 70) / 2 + (50 + 65 + 90) / 3) / 3)
    assert forgetting_lpi(R) == pytest.approx(((50 - 85) + (65 - 70) + 0) / 2)  # -20: negative = forgetting
    assert forgetting_max_minus_last(R) == pytest.approx(((85 - 50) + (70 - 65)) / 2)  # +20
    assert backward_transfer(R) == pytest.approx(((50 - 80) + (65 - 70)) / 2)  # -17.5


def _lpi_reference(r: np.ndarray) -> tuple[float, float]:
    """LPI's res_handle/reshandle.py as loops: A@K and F@K on R[i][j] (i >= j)."""
    n = len(r)
    avg = sum(sum(r[i][j] for i in range(j, n)) / (n - j) for j in range(n)) / n
    forget = sum(r[n - 1][j] - max(r[i][j] for i in range(j, n - 1)) for j in range(n - 1)) / (n - 1)
    return avg, forget


def test_matches_loop_reference_on_random_matrices():
    rng = np.random.default_rng(0)
    for n in (2, 5, 12):
        r = np.tril(rng.uniform(0, 100, (n, n))) + np.triu(np.full((n, n), np.nan), 1)
        avg, forget = _lpi_reference(r)
        assert average_over_time(r) == pytest.approx(avg)
        assert forgetting_lpi(r) == pytest.approx(forget)
        assert forgetting_max_minus_last(r) == pytest.approx(-forget)  # same quantity, opposite sign


def test_no_forgetting_when_scores_never_drop():
    r = [[50.0, None], [60.0, 40.0]]
    assert forgetting_max_minus_last(r) == pytest.approx(-10.0)  # improved: negative forgetting
    assert backward_transfer(r) == pytest.approx(10.0)


def test_single_session_has_no_forgetting():
    s = summarize([[70.0, None, None]])
    assert s["last"] == 70.0 and s["avg_over_time"] == 70.0
    assert math.isnan(s["forgetting"]) and math.isnan(s["forgetting_lpi"]) and math.isnan(s["bwt"])


def test_partial_run_uses_seen_tasks_only():
    r = [[80.0, None, None, None], [70.0, 60.0, None, None]]  # 2 of 4 tasks done
    assert final_average(r) == pytest.approx(65.0)
    assert forgetting_max_minus_last(r) == pytest.approx(10.0)


def test_summary_keys_name_metric_and_measure():
    out = summarize_matrices({"i2t/R@1": R, "acc": R})
    assert set(out) == {f"cl/{m}/{k}" for m in ("i2t/R@1", "acc") for k in MEASURES}
    assert out["cl/i2t/R@1/forgetting"] == pytest.approx(20.0)
    assert set(DEFINITIONS) == set(MEASURES)


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match=r"R\[1\]\[0\] is missing"):
        as_matrix([[1.0, None], [None, 2.0]])
    with pytest.raises(ValueError, match="sessions but only"):
        as_matrix([[1.0], [2.0]])
    with pytest.raises(ValueError, match="same length"):
        as_matrix([[1.0, None], [2.0]])
