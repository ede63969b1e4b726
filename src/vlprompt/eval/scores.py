"""Similarity scores whose ties are real ties, and the one tie rule every ranking uses.

A float32 matrix product is not a function of its two vectors alone: how a BLAS kernel blocks the gallery decides
the order of the summation, so two identical gallery rows can score one unit in the last place apart, and which
kernel the machine runs (``OPENBLAS_CORETYPE``, MKL's instruction set) decides which one "wins". Scores here are
sums of float64 products (each float32 x float32 product is exact in float64) rounded to float32, so equal vectors
score equally on every kernel: two float64 sums of the same products, added in different orders, differ by about
1e-13 of their magnitude at most, far below a float32 unit (6e-8), and the rounding to float32 removes the difference
unless the exact value lies that close to a float32 rounding boundary (a chance of 1e-6 per tied pair at worst).

The tie rule (index search, exact top-k, agreement with exact search): best score first; among equal scores, the
lower row first. Retrieval ranks (:mod:`vlprompt.eval.retrieval`) count ties explicitly (optimistic/pessimistic).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Gallery rows converted to float64 at once: bounds the extra memory of a large gallery (4096 x 1024 x 8 B = 32 MiB).
_GALLERY_CHUNK = 4096


def similarity(queries: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inner products ``queries @ gallery.T`` summed in float64 and returned in ``dtype`` (float32 or float64)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    q = queries.detach().to(torch.float64)
    g = gallery.detach().to(q.device)
    parts = [q @ g[i : i + _GALLERY_CHUNK].to(torch.float64).T for i in range(0, g.shape[0], _GALLERY_CHUNK)]
    out = torch.cat(parts, dim=1) if parts else q.new_zeros((q.shape[0], 0))
    return out.to(dtype)


def similarity_np(queries: Any, gallery: Any) -> np.ndarray:
    """:func:`similarity` for arrays: float32 scores ``[n, m]`` (a 1-D query is one row)."""
    q = torch.from_numpy(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    g = torch.from_numpy(np.atleast_2d(np.asarray(gallery, dtype=np.float32)))
    return similarity(q, g).numpy()


def order_by_score(scores: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per query, the positions of ``scores`` ``[n, m]`` best first, equal scores by row (``rows`` or the column)."""
    scores = np.atleast_2d(scores)
    if rows is None:
        rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((rows, -scores), axis=1)


def top_k(queries: Any, gallery: Any, k: int) -> np.ndarray:
    """Brute-force top-k gallery rows ``[n, k]`` by inner product under the tie rule."""
    return order_by_score(similarity_np(queries, gallery))[:, :k]
