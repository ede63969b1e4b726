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
