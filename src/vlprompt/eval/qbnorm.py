"""QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022), as DGL's search script applies it.

Post-processing of a similarity matrix, reported separately from raw metrics and never tuned on test data.
For bank similarities ``B [n_bank, n_gallery]`` (queries from a *training* query bank against the test gallery)
and test similarities ``S [n_query, n_gallery]``:

1. activation set ``A = {j : #{b : j in top-k(B_b)} >= theta}`` (gallery items that are hubs for the bank);
2. normaliser ``Z_j = sum_b exp(beta * B_bj)``;
3. every query whose top-1 item is in ``A`` gets its row replaced by ``exp(beta * S_ij) / Z_j``; other rows keep
   their raw scores (ranking is per row, so mixing scales across rows is harmless).
"""

from __future__ import annotations

import numpy as np


def qb_norm(sim: np.ndarray, bank: np.ndarray, beta: float = 1.0, k: int = 1, theta: int = 1) -> np.ndarray:
    """Return a renormalised copy of ``sim`` (see module docstring); inputs are on the logit scale."""
    sim = np.asarray(sim, dtype=np.float64)
    bank = np.asarray(bank, dtype=np.float64)
    if sim.ndim != 2 or bank.ndim != 2 or sim.shape[1] != bank.shape[1]:
        raise ValueError(f"sim {sim.shape} and bank {bank.shape} must be 2-D with the same number of gallery columns")
    if not 1 <= k <= bank.shape[1]:
        raise ValueError(f"k must be in 1..{bank.shape[1]}, got {k}")
    top = np.argpartition(-bank, k - 1, axis=1)[:, :k]
    hits = np.bincount(top.ravel(), minlength=bank.shape[1])
    active = hits >= theta
    # subtract a per-column max before exp for stability; it cancels in the ratio exp(beta*S)/Z
    shift = beta * np.maximum(bank.max(axis=0), sim.max(axis=0))
    z = np.exp(beta * bank - shift).sum(axis=0)
    out = sim.copy()
    rows = active[sim.argmax(axis=1)]
    out[rows] = np.exp(beta * sim[rows] - shift) / z
    return out
