"""Class-incremental measures under the names the class-incremental papers use, on the accuracy matrix of
:mod:`vlprompt.eval.continual` (``R[i][j]`` = accuracy on task ``j``'s test set after training task ``i``,
predictions over every class seen so far, no task id; ``n`` sessions).

* **FAA** (final average accuracy; "Last"/"average accuracy" of L2P, DualPrompt, CODA-Prompt, HiDe):
  ``(1/n) sum_j R[n-1][j]``. Same value as ``last`` of :mod:`vlprompt.eval.continual`.
* **CAA** (cumulative average accuracy, IT-Prompt's journal; iCaRL's average incremental accuracy):
  ``(1/n) sum_i A_i`` with ``A_i = mean_{j<=i} R[i][j]``. Same value as ``avg_incremental``.
* **FFM** (final forgetting measure, HiDe/L2P-pytorch engines): ``(1/(n-1)) sum_{j<n-1} (max_{j<=i<=n-1} R[i][j] -
  R[n-1][j])``. The max runs over every session *including the last*, so every term is ``>= 0``; it differs from the
  max-minus-last ``forgetting`` of :mod:`vlprompt.eval.continual` (max over sessions before the last, Chaudhry et
  al.) only when a task's final accuracy is its best.
* **forgetting (CODA)** (CODA-Prompt's ``calc_forgetting``, also VQ-Prompt's): the average step-wise drop
  ``(1/(n-1)) sum_{t=1}^{n-1} (1/t) sum_{j<t} (R[t-1][j] - R[t][j])``; positive = forgetting.

All need at least one session; the forgetting measures are NaN with one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlprompt.eval.continual import as_matrix, average_incremental, final_average

#: Class-incremental measures, in output order, with their definitions.
CIL_DEFINITIONS: dict[str, str] = {
    "faa": "FAA, final average accuracy: (1/n) sum_j R[n-1][j] (L2P/DualPrompt/CODA-Prompt/HiDe 'average accuracy')",
    "caa": "CAA, cumulative average accuracy: (1/n) sum_i mean_{j<=i} R[i][j] (IT-Prompt journal; iCaRL's average "
    "incremental accuracy)",
    "ffm": "FFM, final forgetting: (1/(n-1)) sum_{j<n-1} (max_{j<=i<=n-1} R[i][j] - R[n-1][j]); max includes the "
    "last session (HiDe/L2P-pytorch engines); >= 0",
    "forgetting_coda": "CODA-Prompt's calc_forgetting: (1/(n-1)) sum_{t=1}^{n-1} (1/t) sum_{j<t} (R[t-1][j] - "
    "R[t][j]); positive = forgetting",
}


def faa(matrix: Any) -> float:
    """Final average accuracy."""
    return final_average(matrix)


def caa(matrix: Any) -> float:
    """Cumulative (average incremental) accuracy."""
    return average_incremental(matrix)


def ffm(matrix: Any) -> float:
    """HiDe's final forgetting measure (max over all sessions, the last included)."""
    r = as_matrix(matrix)
    n = r.shape[0]
    if n < 2:
        return math.nan
    best = np.array([r[j:n, j].max() for j in range(n - 1)])
    return float((best - r[n - 1, : n - 1]).mean())


def forgetting_coda(matrix: Any) -> float:
    """CODA-Prompt's forgetting: the mean over steps of the average drop of the earlier tasks."""
    r = as_matrix(matrix)
    n = r.shape[0]
    if n < 2:
        return math.nan
    total = sum((r[t - 1, :t] - r[t, :t]).sum() / t for t in range(1, n))
    return float(total / (n - 1))


CIL_MEASURES = {"faa": faa, "caa": caa, "ffm": ffm, "forgetting_coda": forgetting_coda}


def summarize_cil(matrix: Any, prefix: str = "cil/acc") -> dict[str, float]:
    """``{f"{prefix}/{measure}": value}`` for every class-incremental measure."""
    return {f"{prefix}/{name}": fn(matrix) for name, fn in CIL_MEASURES.items()}
