"""Continual-learning metrics as pure functions of an accuracy matrix.

``R[i][j]`` is the score (accuracy, R@K, ... in percent) on task ``j`` after training session ``i``; only
``j <= i`` is defined (the runner stores NaN above the diagonal: a task is evaluated once it has been seen).
``n`` is the number of sessions, i.e. of rows. Each definition names the project whose convention it matches:

* **final average** ("Last", "average accuracy" of L2P/DualPrompt/CODA-Prompt): ``mean_j R[n-1][j]``.
* **average over time** (LPI's ``A@K``, printed as "average precision" by ``res_handle/reshandle.py``):
  ``(1/n) sum_j mean_{i >= j} R[i][j]``: each task's mean over every session that evaluated it.
* **average incremental** (iCaRL's average incremental accuracy): ``(1/n) sum_i mean_{j <= i} R[i][j]``.
* **forgetting, LPI convention** (LPI's ``F@K``): ``(1/(n-1)) sum_{j<n-1} (R[n-1][j] - max_{j<=i<=n-2} R[i][j])``;
  the last task contributes 0 and **negative values mean forgetting**.
* **forgetting, max-minus-last** (Chaudhry et al. 2018; L2P's and HiDe's code use the max over every session, FFM):
  ``(1/(n-1)) sum_{j<n-1} (max_{j<=i<=n-2} R[i][j] - R[n-1][j])``; **positive values mean forgetting**. It is
  exactly the negative of LPI's value.
* **backward transfer** (GEM, Lopez-Paz & Ranzato 2017): ``(1/(n-1)) sum_{j<n-1} (R[n-1][j] - R[j][j])``;
  negative values mean forgetting.

Forgetting and backward transfer need at least two sessions; with one they are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Summary measures, in output order, each with the definition and the project it matches.
DEFINITIONS: dict[str, str] = {
    "last": "final average: mean_j R[n-1][j] (L2P/DualPrompt/CODA-Prompt 'average accuracy', LPI 'Last')",
    "avg_over_time": "LPI's A@K: (1/n) sum_j mean_{i>=j} R[i][j] (res_handle/reshandle.py 'average precision')",
    "avg_incremental": "average incremental: (1/n) sum_i mean_{j<=i} R[i][j] (iCaRL)",
    "forgetting_lpi": "LPI's F@K: (1/(n-1)) sum_{j<n-1} (R[n-1][j] - max_{j<=i<=n-2} R[i][j]); negative = forgetting",
    "forgetting": "max-minus-last: (1/(n-1)) sum_{j<n-1} (max_{j<=i<=n-2} R[i][j] - R[n-1][j]); positive = "
    "forgetting (Chaudhry et al. 2018). L2P's and HiDe's code take the max over every session including the last "
    "(reported as FFM by the class-incremental runner, vlprompt.eval.cil)",
    "bwt": "backward transfer: (1/(n-1)) sum_{j<n-1} (R[n-1][j] - R[j][j]); negative = forgetting (GEM)",
}


def as_matrix(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> np.ndarray:
    """A validated float array ``[n, m]`` with ``m >= n``; None becomes NaN; every ``j <= i`` cell must be finite."""
    rows = [[math.nan if v is None else float(v) for v in row] for row in matrix]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("an accuracy matrix needs at least one row, all rows of the same length")
    r = np.asarray(rows, dtype=float)
    n, m = r.shape
    if m < n:
        raise ValueError(f"accuracy matrix has {n} sessions but only {m} tasks")
    lower = np.tril(np.ones((n, m), dtype=bool))
    if not np.isfinite(r[lower]).all():
        i, j = np.argwhere(lower & ~np.isfinite(r))[0]
        raise ValueError(f"R[{i}][{j}] is missing: task {j} must be evaluated after session {i} (j <= i)")
    return r


def final_average(matrix: Any) -> float:
    """Mean over tasks 0..n-1 after the last session."""
    r = as_matrix(matrix)
    n = r.shape[0]
    return float(r[n - 1, :n].mean())


def average_over_time(matrix: Any) -> float:
    """LPI's ``A@K``: each task's mean over the sessions that evaluated it, averaged over tasks."""
    r = as_matrix(matrix)
    n = r.shape[0]
    return float(np.mean([r[j:, j].mean() for j in range(n)]))


def average_incremental(matrix: Any) -> float:
    """iCaRL's average incremental accuracy: the mean of each session's average over the tasks seen so far."""
    r = as_matrix(matrix)
    return float(np.mean([r[i, : i + 1].mean() for i in range(r.shape[0])]))


def _best_before_last(r: np.ndarray) -> np.ndarray:
    """``max_{j <= i <= n-2} R[i][j]`` for ``j = 0..n-2``."""
    n = r.shape[0]
    return np.array([r[j : n - 1, j].max() for j in range(n - 1)])


def forgetting_lpi(matrix: Any) -> float:
    """LPI's ``F@K`` (final minus best earlier, the last task counts 0): negative = forgetting."""
    r = as_matrix(matrix)
    n = r.shape[0]
    if n < 2:
        return math.nan
    return float((r[n - 1, : n - 1] - _best_before_last(r)).sum() / (n - 1))


def forgetting_max_minus_last(matrix: Any) -> float:
    """Average forgetting (best earlier minus final) over tasks 0..n-2: positive = forgetting."""
    r = as_matrix(matrix)
    n = r.shape[0]
    if n < 2:
        return math.nan
    return float((_best_before_last(r) - r[n - 1, : n - 1]).mean())


def backward_transfer(matrix: Any) -> float:
    """GEM's BWT: final minus just-learned score, averaged over tasks 0..n-2: negative = forgetting."""
    r = as_matrix(matrix)
    n = r.shape[0]
    if n < 2:
        return math.nan
    return float((r[n - 1, : n - 1] - np.diag(r)[: n - 1]).mean())


MEASURES = {
    "last": final_average,
    "avg_over_time": average_over_time,
    "avg_incremental": average_incremental,
    "forgetting_lpi": forgetting_lpi,
    "forgetting": forgetting_max_minus_last,
    "bwt": backward_transfer,
}


def summarize(matrix: Any) -> dict[str, float]:
    """Every measure of :data:`MEASURES` on one matrix (NaN where undefined)."""
    return {name: fn(matrix) for name, fn in MEASURES.items()}


def summarize_matrices(matrices: Mapping[str, Any], prefix: str = "cl") -> dict[str, float]:
    """Flat summary of several matrices, keyed ``f"{prefix}/{metric}/{measure}"`` (e.g. ``cl/i2t/R@1/forgetting``)."""
    return {f"{prefix}/{metric}/{measure}": v for metric, m in matrices.items() for measure, v in summarize(m).items()}
