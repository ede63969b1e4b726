"""Exact scores: equal vectors tie on every BLAS kernel, and one tie rule orders them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlprompt.eval import scores
from vlprompt.eval.scores import order_by_score, similarity, similarity_np, top_k


def _gallery_with_duplicates(m: int, d: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Unit rows where rows ``m // 2`` and ``m - 1`` copy row 1 (positions that fall in different GEMM blocks)."""
    g = np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    copies = [1, m // 2, m - 1]
    g[copies] = g[1]
    return g, copies


@pytest.mark.parametrize("d", [64, 96, 512])
@pytest.mark.parametrize("m", [33, 67, 301])
@pytest.mark.parametrize("n", [1, 5])
def test_equal_vectors_score_equally(d: int, m: int, n: int) -> None:
    # A float32 product scores these copies one unit in the last place apart in about half of these cases (numpy
    # under the Haswell, Prescott, SkylakeX and Zen OpenBLAS kernels, and PyTorch); float64 sums rounded do not.
    g, copies = _gallery_with_duplicates(m, d)
    s = similarity_np(g[1 : 1 + n], g)
    for c in copies[1:]:
        np.testing.assert_array_equal(s[:, c], s[:, 1])


def test_scores_are_the_inner_products() -> None:
    g, _ = _gallery_with_duplicates(50, 32, seed=1)
    q = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    expected = q.astype(np.float64) @ g.astype(np.float64).T
    np.testing.assert_allclose(similarity_np(q, g), expected, rtol=0, atol=1e-6)
    assert similarity_np(q, g).dtype == np.float32
    assert similarity_np(q[0], g).shape == (1, 50)  # a 1-D query is one row


def test_float64_scores_keep_what_float32_rounds_away() -> None:
    q = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert similarity(q, g, torch.float64)[0, 1] > similarity(q, g, torch.float64)[0, 0]
    assert similarity(q, g)[0, 1] == similarity(q, g)[0, 0]
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        similarity(q, g, torch.float16)


def test_gallery_chunks_do_not_change_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    g, _ = _gallery_with_duplicates(23, 16, seed=3)
    whole = similarity_np(g[:4], g)
    monkeypatch.setattr(scores, "_GALLERY_CHUNK", 5)
    np.testing.assert_array_equal(similarity_np(g[:4], g), whole)


def test_tie_rule_is_best_first_then_lower_row() -> None:
    s = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]], dtype=np.float32)
    assert order_by_score(s).tolist() == [[1, 3, 0, 2, 4]]
    # with explicit row ids (candidates proposed in any order), ties go to the lower row id
    rows = np.array([[7, 4, 2, 9, 0]])
    assert rows[0, order_by_score(s, rows)[0]].tolist() == [4, 9, 2, 7, 0]


@pytest.mark.parametrize("d", [64, 96, 512])
@pytest.mark.parametrize("m", [33, 67, 301])
def test_top_k_puts_the_copies_in_row_order(d: int, m: int) -> None:
    g, copies = _gallery_with_duplicates(m, d)
    assert top_k(g[1], g, 3).tolist() == [copies]
    # wherever the copies rank, they stand together, lowest row first (one query at a time: BLAS's gemv path)
    for ranking in [top_k(q, g, m)[0].tolist() for q in g[:8]] + top_k(g[:8], g, m).tolist():
        places = [ranking.index(c) for c in copies]
        assert places == list(range(places[0], places[0] + 3))


def test_an_empty_gallery_gives_an_empty_score_matrix() -> None:
    out = similarity(torch.ones(3, 4), torch.ones(0, 4))
    assert out.shape == (3, 0) and out.dtype == torch.float32


def test_array_inputs_are_float32_features_so_float32_equal_rows_tie() -> None:
    """``similarity_np`` rounds float64 inputs to float32 first: rows equal in float32 tie (and keep row order) even
    where their float64 sums, rounded once at the end, would differ by one float32 unit."""
    e = 0.45 * 2.0**-23  # under half a float32 unit at 1.0: 1 + e is 1.0 in float32
    gallery = np.array([[1.0, 1.0, 1.0], [1.0 + e, 1.0 + e, 1.0 + e]])
    query = np.ones((1, 3))
    scores_ = similarity_np(query, gallery)
    assert scores_[0, 0] == scores_[0, 1] == 3.0
    assert similarity_np(gallery, query)[:, 0].tolist() == [3.0, 3.0]  # the same on the query side
    assert top_k(query, gallery[::-1].copy(), 2).tolist() == [[0, 1]]
    assert top_k(query, gallery, 2).tolist() == [[0, 1]]
