"""ROUGE-L: hand-computed values, the vectorised LCS against the plain dynamic programme, the relevance matrix."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlprompt.eval import rouge
from vlprompt.eval.rouge import (
    img2txt_from_txt2img,
    lcs_length,
    lcs_matrix,
    relevance_matrix,
    rouge_l,
    tokenize,
)


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A red Star, left of a blue circle.") == ["a", "red", "star", "left", "of", "a", "blue", "circle"]
    assert tokenize("  ") == []


def test_lcs_length_known_values() -> None:
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length("a b".split(), "b a".split()) == 1
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_by_hand() -> None:
    # candidate 3 words; LCS 2 with both references -> P = max(2/3, 2/3), R = max(2/3, 2/2)
    p, r, b2 = 2 / 3, 1.0, 1.2**2
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert rouge_l("a red square", ["a red circle", "red square"]) == pytest.approx(expected)
    assert rouge_l("a red square", ["a red square", "something else"]) == pytest.approx(1.0)
    assert rouge_l("a red square", ["blue circle"]) == 0.0
    assert rouge_l("", ["blue circle"]) == 0.0
    with pytest.raises(ValueError):
        rouge_l("x", [])


def _random_captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["a", "red", "blue", "star", "circle", "left", "of", "big", "small", "the"]
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(n)]
    caps[0] = "A big, red star!"  # punctuation and case go through the same tokenizer
    return caps


def test_vectorised_lcs_matches_plain_dp_across_blocks(monkeypatch) -> None:
    monkeypatch.setattr(rouge, "_BLOCK", 7)  # several row and column blocks, sorted by length
    a, b = _random_captions(23, 0), _random_captions(17, 1)
    got = lcs_matrix(a, b)
    expected = np.array([[lcs_length(tokenize(x), tokenize(y)) for y in b] for x in a])
    np.testing.assert_array_equal(got, expected)


def test_relevance_matrix_matches_rouge_l(monkeypatch) -> None:
    monkeypatch.setattr(rouge, "_BLOCK", 5)
    captions = _random_captions(30, 2)
    txt2img = [i // 5 for i in range(30)]  # 6 images x 5 captions
    img2txt = img2txt_from_txt2img(txt2img)
    rel = relevance_matrix(captions, img2txt)
    assert rel.shape == (30, 6) and rel.dtype == np.float32
    for c in range(30):
        for j in range(6):
            assert rel[c, j] == pytest.approx(rouge_l(captions[c], [captions[k] for k in img2txt[j]]), abs=1e-6)


def test_relevance_shape_and_own_image_is_one() -> None:
    caps = [f"a {c} {s} number {k}" for c in ("red", "blue", "green") for s in ("star", "ring") for k in range(5)]
    txt2img = [i // 5 for i in range(len(caps))]
    rel = relevance_matrix(caps, img2txt_from_txt2img(txt2img))
    n = len(caps) // 5
    assert rel.shape == (5 * n, n)
    np.testing.assert_allclose(rel[np.arange(len(caps)), txt2img], 1.0)  # the caption is among its references
    assert (rel <= 1.0 + 1e-6).all() and (rel >= 0).all()


def test_every_image_needs_references() -> None:
    with pytest.raises(ValueError, match="at least one caption"):
        relevance_matrix(["a"], [[0], []])
