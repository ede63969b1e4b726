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


# Captions and the tokens of coco-caption's pipeline for them: Stanford PTBTokenizer 3.4.1 run with -lowerCase
# (the Java tokenizer itself, run once on these lines), then coco-caption's PUNCTUATIONS removed.
PTB_CASES = [
    ("A young boy in a red T-shirt is flying a kite.", "a young boy in a red t-shirt is flying a kite"),
    ("A black-and-white photo of a well-known 19th-century building.",
     "a black-and-white photo of a well-known 19th-century building"),
    ("An elephant - standing in the water - sprays itself.", "an elephant standing in the water sprays itself"),
    ("A chef cooks in a restaurant's kitchen--it's busy.", "a chef cooks in a restaurant 's kitchen it 's busy"),
    ("He doesn't like it, can't you see? It's \"great\" -- really...",
     "he does n't like it ca n't you see it 's great really"),
    ("Two kids' toys on a table; a cat's bowl: empty!", "two kids toys on a table a cat 's bowl empty"),
    ("Here is a sign that says 'Welcome to Florida'", "here is a sign that says welcome to florida"),
    ("it’s “curly” ‘quoted’ `back` ``double''", "it 's curly quoted back double"),
    ("A man cannot go, gonna wanna gotta", "a man can not go gon na wan na got ta"),
    ("The U.S. flag waves at 3.5 m/s near 10:30 am, costing $1,000 & 50%.",
     "the u.s. flag waves at 3.5 m/s near 10:30 am costing $ 1,000 & 50 %"),
    ("Dr. Smith's office at 12:45 p.m. on St. Paul St.", "dr. smith 's office at 12:45 p.m. on st. paul st."),
    ("A dog (brown) on a [blurry] {photo}", "a dog -lrb- brown -rrb- on a -lsb- blurry -rsb- -lcb- photo -rcb-"),
    ("wow!! what?! no?? yes.. hmm--- ok....", "wow !! what ?! no ?? yes hmm ok"),
    ("The bathroom has a shower/tub combo, a 2-door fridge and 30,000 tiles.",
     "the bathroom has a shower/tub combo a 2-door fridge and 30,000 tiles"),
    ("a-  -b  o'clock ma'am the '90s 1980's", "a b o'clock ma'am the '90s 1980 's"),
]  # fmt: skip


@pytest.mark.parametrize(("caption", "tokens"), PTB_CASES)
def test_tokenize_matches_coco_captions_ptb_pipeline(caption: str, tokens: str) -> None:
    assert tokenize(caption) == tokens.split(" ")


def test_hyphenated_words_are_one_token_in_rouge_l() -> None:
    # "t-shirt" is one token: against "t shirt" the candidate shares 4 of its 5 tokens, not all 6 words
    p, r, b2 = 4 / 5, 4 / 6, 1.2**2
    assert rouge_l("a man in a t-shirt", ["a man in a t shirt"]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert rouge_l("A man in a T-shirt.", ["a man in a t-shirt"]) == pytest.approx(1.0)  # case and "." do not count


def test_whitespace_tokenizer_is_terns_lower_and_split() -> None:
    assert tokenize("A dog  on a Table.", "whitespace") == ["a", "dog", "", "on", "a", "table."]
    assert rouge_l("a red square.", ["a red square"], tokenizer="whitespace") == pytest.approx(
        (1 + 1.2**2) * (2 / 3) * (2 / 3) / (2 / 3 + 1.2**2 * 2 / 3)
    )  # "square." is not "square"
    rel = relevance_matrix(["a red square.", "a red square"], [[0], [1]], tokenizer="whitespace")
    assert rel[0, 1] < 1.0 and relevance_matrix(["a red square.", "a red square"], [[0], [1]])[0, 1] == 1.0
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize("a", "bpe")


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


def test_punctuation_only_caption_scores_zero_and_single_caption_images_are_fine(monkeypatch) -> None:
    """A caption without tokens has ROUGE-L 0 against everything (no 0/0 NaN); an image with one caption is valid."""
    captions = ["a dog runs", ", . ; :", "a cat sits", "a dog sits"]
    rel = relevance_matrix(captions, [[0, 1], [2], [3]])
    assert np.isfinite(rel).all()
    np.testing.assert_array_equal(rel[1], np.zeros(3, dtype=np.float32))
    assert rel[0, 0] == pytest.approx(1.0) and rel[2, 1] == pytest.approx(1.0)
    assert rel[0, 2] == pytest.approx(rouge_l(captions[0], [captions[3]]), abs=1e-6)


def test_relevance_progress_reports_each_row_chunk_once(monkeypatch) -> None:
    monkeypatch.setattr(rouge, "_BLOCK", 2)  # row chunks of 4 * 2 = 8 captions
    captions = [f"caption number {i}" for i in range(20)]
    calls: list[tuple[int, int]] = []
    relevance_matrix(captions, [[i] for i in range(20)], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_img2txt_from_txt2img_keeps_images_without_captions() -> None:
    assert img2txt_from_txt2img([0, 0, 2], num_images=4) == [[0, 1], [], [2], []]
    assert img2txt_from_txt2img([1, 0]) == [[1], [0]]
    assert img2txt_from_txt2img([]) == []


def test_lcs_matrix_progress_counts_row_blocks(monkeypatch) -> None:
    monkeypatch.setattr(rouge, "_BLOCK", 4)
    captions = [f"a caption with {i} words" for i in range(10)]
    calls: list[tuple[int, int]] = []
    lcs_matrix(captions, captions[:3], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_lcs_matrix_of_no_captions_is_empty() -> None:
    assert lcs_matrix([], ["a red ball"]).shape == (0, 1)
    assert lcs_matrix(["a red ball"], []).shape == (1, 0)


def test_the_tokenizer_option_reaches_references_and_both_sides_of_the_lcs() -> None:
    # "man." is a token of its own only under the whitespace tokenizer
    assert rouge_l("a man.", ["a man."], tokenizer="whitespace") == pytest.approx(1.0)
    assert rouge_l("a man.", ["a man"], tokenizer="whitespace") == pytest.approx(0.5)
    got = lcs_matrix(["a man", "a man."], ["a man.", "a man"], tokenizer="whitespace")
    assert got.tolist() == [[1, 2], [2, 1]]
    assert lcs_matrix(["a man", "a man."], ["a man.", "a man"]).tolist() == [[2, 2], [2, 2]]


def test_urls_stay_whole_even_with_a_typographic_apostrophe() -> None:
    # a word "don’t" splits at its clitic; inside a URL or after an e-mail's @ nothing is split or rewritten
    assert tokenize("don’t") == ["do", "n't"]
    assert tokenize("see http://a.com/don’t now") == ["see", "http://a.com/don’t", "now"]
