"""QB-Norm: the toy case of the DGL spec (section 10.9)."""

from __future__ import annotations

import numpy as np
import pytest

from vlprompt.eval.qbnorm import qb_norm


def test_spec_toy_case() -> None:
    bank = np.array([[5, 1, 0], [4, 2, 0], [6, 0, 1], [0, 3, 1]], dtype=float)
    test = np.array([[2, 1.9, 0], [0, 1, 3], [1, 2, 0.5]])
    out = qb_norm(test, bank, beta=1.0, k=1, theta=2)
    z = np.exp(bank).sum(axis=0)
    assert np.allclose(z, [607.440, 31.193, 7.437], atol=1e-3)
    # the per-column shift that keeps exp() finite cancels between numerator and Z
    assert np.allclose(out[0], [0.012164, 0.214340, 0.134471], atol=1e-6)
    assert out[0].argmax() == 1
    assert np.array_equal(out[1:], test[1:])


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="gallery columns"):
        qb_norm(np.zeros((2, 3)), np.zeros((2, 4)))


def _qb_norm_loops(sim: np.ndarray, bank: np.ndarray, beta: float, k: int, theta: int) -> np.ndarray:
    """The dynamic inverted softmax written out per gallery item and per query (no shift, small logits)."""
    n_gallery = bank.shape[1]
    hits = np.zeros(n_gallery, dtype=int)
    for row in bank:
        for j in sorted(range(n_gallery), key=lambda j: -row[j])[:k]:
            hits[j] += 1
    z = np.array([sum(np.exp(beta * b[j]) for b in bank) for j in range(n_gallery)])
    out = sim.astype(np.float64).copy()
    for q, row in enumerate(sim):
        if hits[int(np.argmax(row))] >= theta:
            out[q] = np.exp(beta * row) / z
    return out


@pytest.mark.parametrize("k,theta", [(1, 1), (1, 2), (2, 2), (3, 3), (5, 4)])
def test_matches_loop_definition_for_each_k_and_theta(k: int, theta: int) -> None:
    """Activation set = items in the top-k of at least theta bank queries (>=, the k best, not k+1 or k-1)."""
    rng = np.random.default_rng(k * 10 + theta)
    # distinct values with clear gaps, so the top-k of every row is unambiguous
    bank = rng.permutation(np.arange(8 * 5, dtype=float)).reshape(8, 5) / 10.0
    sim = rng.permutation(np.arange(6 * 5, dtype=float)).reshape(6, 5) / 10.0
    out = qb_norm(sim, bank, beta=0.7, k=k, theta=theta)
    assert np.allclose(out, _qb_norm_loops(sim, bank, 0.7, k, theta), rtol=1e-9, atol=0)


def test_defaults_are_beta_1_top_1_theta_1() -> None:
    """DGL's search script: beta = 1, k = 1, theta = 1 (every bank hub is active)."""
    bank = np.array([[5, 1, 0], [4, 2, 0], [0, 3, 1]], dtype=float)
    sim = np.array([[2, 1.9, 0], [0, 1, 3], [1, 2, 0.5]])
    assert np.allclose(qb_norm(sim, bank), _qb_norm_loops(sim, bank, 1.0, 1, 1), rtol=1e-9, atol=0)
    # theta = 1: items 0 and 1 are hubs; query 1's top-1 (item 2) is not, so its row keeps its raw scores
    assert np.array_equal(qb_norm(sim, bank)[1], sim[1])


def test_integer_logits_are_normalised_in_float64() -> None:
    """Integer inputs must not truncate the renormalised row (probabilities in (0, 1)) to zeros."""
    bank = np.array([[5, 1, 0], [4, 2, 0], [0, 3, 1]])
    sim = np.array([[2, 1, 0], [0, 1, 3]])
    out = qb_norm(sim, bank)
    assert out.dtype == np.float64
    assert np.allclose(out, _qb_norm_loops(sim.astype(float), bank.astype(float), 1.0, 1, 1), rtol=1e-9, atol=0)


def test_k_may_be_the_whole_gallery() -> None:
    bank = np.array([[5.0, 1.0, 0.0], [4.0, 2.0, 0.0]])
    sim = np.array([[2.0, 1.0, 0.0]])
    assert np.allclose(qb_norm(sim, bank, k=3, theta=2), _qb_norm_loops(sim, bank, 1.0, 3, 2), rtol=1e-9, atol=0)


def test_large_logits_stay_finite_per_column() -> None:
    """beta * logit in the thousands overflows exp(); a per-column shift (not a global or per-row one) keeps every
    column finite even when the columns live on very different scales (the ratio is shift-invariant)."""
    bank = np.array([[1000.0, 1.0, 0.5], [999.0, 2.0, 0.0]])
    sim = np.array([[1000.5, 1.5, 0.2], [998.0, 2.5, 0.1], [997.0, 0.0, 1.0]])
    out = qb_norm(sim, bank, beta=1.0, k=1, theta=1)
    assert np.isfinite(out).all()
    expected = np.exp(sim[0] - bank.max(axis=0)) / np.exp(bank - bank.max(axis=0)).sum(axis=0)
    assert np.allclose(out[0], expected, rtol=1e-9)


def test_one_dimensional_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        qb_norm(np.zeros(3), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        qb_norm(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="k must be"):
        qb_norm(np.zeros((2, 3)), np.zeros((2, 3)), k=4)
