"""NDCG@K and RVLR's single-modal and mixed protocols (spec B9.6, B9.7), against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlprompt.eval import bidirectional_metrics
from vlprompt.eval import ndcg as ndcg_module
from vlprompt.eval.ndcg import mixed_ndcg, modal_balance_metrics, ndcg_at_k, single_modal_ndcg


def _brute_ndcg(scores: np.ndarray, rel: np.ndarray, k: int, drop: list[int | None] | None = None) -> float:
    """The definition, one query at a time, with an optional gallery item removed per query."""
    values = []
    for q in range(scores.shape[0]):
        items = [g for g in range(scores.shape[1]) if drop is None or g != drop[q]]
        ranked = sorted(items, key=lambda g: (-scores[q, g], g))[:k]
        dcg = sum(rel[q, g] / math.log2(r + 2) for r, g in enumerate(ranked))
        ideal = sorted((rel[q, g] for g in items), reverse=True)[:k]
        idcg = sum(v / math.log2(r + 2) for r, v in enumerate(ideal))
        values.append(dcg / idcg if idcg > 0 else 0.0)
    return 100 * float(np.mean(values))


def test_hand_computed_value() -> None:
    rel = np.array([[3.0, 2.0, 0.0, 1.0]])
    scores = np.array([[0.9, 0.1, 0.8, 0.5]])  # ranking: 0 (3), 2 (0), 3 (1), 1 (2)
    dcg = 3 / math.log2(2) + 0 + 1 / math.log2(4) + 2 / math.log2(5)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(scores, rel, ks=(4,))[4] == pytest.approx(100 * dcg / idcg)
    assert ndcg_at_k(scores, rel, ks=(1,))[1] == pytest.approx(100.0)


def test_ideal_ranking_is_one_and_reversed_is_lower() -> None:
    rng = np.random.default_rng(0)
    rel = rng.random((7, 60))
    ideal = ndcg_at_k(rel, rel)
    assert all(v == pytest.approx(100.0) for v in ideal.values())
    reversed_ = ndcg_at_k(-rel, rel)
    assert all(reversed_[k] < ideal[k] for k in ideal)


def test_all_zero_relevance_gives_zero_without_nan() -> None:
    out = ndcg_at_k(np.random.default_rng(0).random((4, 12)), np.zeros((4, 12)))
    assert out == {10: 0.0, 20: 0.0, 50: 0.0}


def test_matches_brute_force_with_ties_and_exclusion(monkeypatch) -> None:
    monkeypatch.setattr(ndcg_module, "_CHUNK", 3)  # chunking must not change anything
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, (10, 15)).astype(float)  # many ties: broken by gallery order
    rel = rng.random((10, 15)) * (rng.random((10, 15)) > 0.5)
    drop = list(rng.integers(0, 15, 10))
    for k in (1, 5, 15, 50):
        assert ndcg_at_k(scores, rel, ks=(k,))[k] == pytest.approx(_brute_ndcg(scores, rel, k))
        assert ndcg_at_k(scores, rel, ks=(k,), exclude=drop)[k] == pytest.approx(_brute_ndcg(scores, rel, k, drop))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ndcg_at_k(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        ndcg_at_k(np.full((1, 2), np.nan), np.zeros((1, 2)))


def _gallery(n: int = 6, per: int = 5, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n * per, dim, generator=g), dim=-1)
    txt2img = [c // per for c in range(n * per)]
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n)]
    rel = torch.rand(n * per, n, generator=g).numpy()
    rel[np.arange(n * per), txt2img] = 1.0
    return img, txt, txt2img, img2txt, rel


def test_single_modal_protocol_excludes_self() -> None:
    img, txt, txt2img, img2txt, rel = _gallery()
    n = img.shape[0]
    first = [c[0] for c in img2txt]
    out = single_modal_ndcg(img, txt, img2txt, rel, ks=(3,))
    i_scores, t_scores = (img @ img.T).numpy(), (txt[first] @ txt.T).numpy()
    assert out["i2i/NDCG@3"] == pytest.approx(_brute_ndcg(i_scores, rel[first], 3, list(range(n))), abs=1e-4)
    assert out["t2t/NDCG@3"] == pytest.approx(_brute_ndcg(t_scores, rel.T, 3, first), abs=1e-4)
    # the official way keeps the query in the list with score 0: with every other score negative it ranks first
    simplex = torch.eye(n) - 1.0 / n  # every pair of distinct images scores -1/n
    official = single_modal_ndcg(simplex, simplex.repeat_interleave(5, 0), img2txt, rel, ks=(1,), official=True)
    ours = single_modal_ndcg(simplex, simplex.repeat_interleave(5, 0), img2txt, rel, ks=(1,))
    assert official["i2i/NDCG@1"] == 0.0 < ours["i2i/NDCG@1"]


def test_mixed_protocol_keeps_self_and_official_transposes() -> None:
    img, txt, txt2img, img2txt, rel = _gallery(seed=3)
    first = [c[0] for c in img2txt]
    out = mixed_ndcg(img, txt, img2txt, rel, ks=(4,))
    i_scores = torch.cat([img @ img.T, img @ txt.T], 1).numpy()
    i_rel = np.concatenate([rel[first], rel.T], 1)
    assert out["i2it/NDCG@4"] == pytest.approx(_brute_ndcg(i_scores, i_rel, 4), abs=1e-4)  # nothing excluded
    q = txt[first]
    t_scores = torch.cat([q @ txt.T, q @ img.T], 1).numpy()
    assert out["t2it/NDCG@4"] == pytest.approx(_brute_ndcg(t_scores, np.concatenate([rel.T, rel[first]], 1), 4), 1e-4)
    official = mixed_ndcg(img, txt, img2txt, rel, ks=(4,), official=True)
    # the reference transposes the image part of t2it, scores and relevance alike
    t_scores_quirk = torch.cat([q @ txt.T, (q @ img.T).T], 1).numpy()
    t_rel_quirk = np.concatenate([rel.T, rel[first].T], 1)
    assert official["t2it/NDCG@4"] == pytest.approx(_brute_ndcg(t_scores_quirk, t_rel_quirk, 4), abs=1e-4)
    assert official["i2it/NDCG@4"] == pytest.approx(out["i2it/NDCG@4"])


def test_official_t2it_transposes_the_image_scores_too() -> None:
    """A hand-made case (2 images, 1 caption each, exact integer scores) where transposing the scores matters.

    Caption-image scores s(c, j) = [[-1, -3], [3, 1]], caption-caption [[2, 0], [0, 2]], Rel = [[1, .25], [.5, 1]].
    Reference (``scores_t2i.T[:, ::5]``): query c0 sees images with s(c0, im0) = -1, s(c1, im0) = 3 and ranks
    im1 (rel .5) then c0 (rel 1); query c1 sees s(c0, im1) = -3, s(c1, im1) = 1 and ranks c1 (1) then im1 (1).
    Transposing only the relevance would rank c0 (1), c1 (.5) for c0 and im0 (.25), c1 (1) for c1.
    """
    txt = torch.tensor([[-1.0, -1.0], [-1.0, 1.0]])
    img = torch.tensor([[-1.0, 2.0], [1.0, 2.0]])
    rel = np.array([[1.0, 0.25], [0.5, 1.0]])
    d2 = 1 / math.log2(3)
    ideal = 1 + d2  # both queries: relevances {1, 1, .5, .5} (c0) and {1, 1, .25, .25} (c1)
    reference = 100 * ((0.5 + d2) / ideal + 1.0) / 2
    relevance_only = 100 * ((1 + 0.5 * d2) / ideal + (0.25 + d2) / ideal) / 2
    official = mixed_ndcg(img, txt, [[0], [1]], rel, ks=(2,), official=True)["t2it/NDCG@2"]
    assert official == pytest.approx(reference)
    assert abs(reference - relevance_only) > 10  # the case separates the two readings


def test_modal_balance_keys_and_protocols() -> None:
    img, txt, txt2img, _, rel = _gallery()
    every = modal_balance_metrics(img, txt, txt2img, rel)
    assert set(every) == {f"{d}/NDCG@{k}" for d in ("i2i", "t2t", "i2it", "t2it") for k in (10, 20, 50)}
    assert set(modal_balance_metrics(img, txt, txt2img, rel, "single-modal")) == {
        k for k in every if k.split("/")[0] in ("i2i", "t2t")
    }
    videos = modal_balance_metrics(img, txt, txt2img, rel, "mixed", visual="v")
    assert set(videos) == {f"{d}/NDCG@{k}" for d in ("v2vt", "t2vt") for k in (10, 20, 50)}
    with pytest.raises(ValueError, match="protocol"):
        modal_balance_metrics(img, txt, txt2img, rel, "cross")
    with pytest.raises(ValueError, match="num_captions, num_images"):
        modal_balance_metrics(img, txt, txt2img, rel.T)


def test_identical_embeddings_give_perfect_recall() -> None:
    img, _, txt2img, _, _ = _gallery(n=20, dim=32)
    txt = img[torch.tensor(txt2img)]  # every caption embedded exactly like its image
    metrics = bidirectional_metrics(txt, img, txt2img)
    assert metrics["t2i/R@1"] == 100.0 and metrics["i2t/R@1"] == 100.0


def _simplex_gallery(n: int = 4):
    """One caption per image, embedded like its image; distinct items score -1/n < 0 (so the zero-score
    self-exclusion of the official mode ranks the query first) and the relevance is asymmetric (so transposing it
    changes t2it)."""
    simplex = torch.eye(n) - 1.0 / n
    rel = np.random.default_rng(1).uniform(0.0, 0.9, (n, n))
    rel[np.arange(n), np.arange(n)] = 1.0
    return simplex, simplex.clone(), list(range(n)), [[i] for i in range(n)], rel


def test_modal_balance_passes_official_and_visual_through_to_both_protocols() -> None:
    """``modal_balance_metrics`` must hand ``official`` (default False) and ``visual`` to both protocols unchanged."""
    img, txt, txt2img, img2txt, rel = _simplex_gallery()
    for official in (False, True):
        single = single_modal_ndcg(img, txt, img2txt, rel, ks=(1, 3), official=official, visual="v")
        mixed = mixed_ndcg(img, txt, img2txt, rel, ks=(1, 3), official=official, visual="v")
        out = modal_balance_metrics(img, txt, txt2img, rel, "all", ks=(1, 3), official=official, visual="v")
        assert out == pytest.approx({**single, **mixed})
    plain = modal_balance_metrics(img, txt, txt2img, rel, ks=(1, 3), visual="v")
    assert plain == pytest.approx(modal_balance_metrics(img, txt, txt2img, rel, ks=(1, 3), official=False, visual="v"))
    quirk = modal_balance_metrics(img, txt, txt2img, rel, ks=(1, 3), official=True, visual="v")
    # the case separates the modes in every direction but i2it (which has no quirk)
    for key in ("v2v/NDCG@1", "t2t/NDCG@1", "t2vt/NDCG@3"):
        assert abs(plain[key] - quirk[key]) > 1.0, key


def test_official_single_modal_keeps_the_query_caption_with_score_zero_in_t2t() -> None:
    img, txt, _, img2txt, rel = _simplex_gallery()
    assert single_modal_ndcg(img, txt, img2txt, rel, ks=(1,), official=True)["t2t/NDCG@1"] == 0.0
    assert single_modal_ndcg(img, txt, img2txt, rel, ks=(1,))["t2t/NDCG@1"] > 0.0


def test_an_image_without_captions_is_rejected() -> None:
    img, txt, _, _, rel = _simplex_gallery()
    with pytest.raises(ValueError, match="non-empty caption list"):
        mixed_ndcg(img, txt, [[0], [1], [], [3]], rel)


@pytest.mark.parametrize("which", ["scores", "relevance"])
def test_ndcg_errors_name_the_bad_input(which: str) -> None:
    args = {"scores": np.zeros((2, 3)), "relevance": np.zeros((2, 3))}
    args[which][0, 0] = np.nan
    with pytest.raises(ValueError, match=f"^{which} contains NaN"):
        ndcg_at_k(args["scores"], args["relevance"])


@pytest.mark.parametrize("which", ["image features", "text features", "relevance"])
def test_protocol_errors_name_the_bad_input(which: str) -> None:
    img, txt, _, img2txt, rel = _simplex_gallery()
    args = {"image features": img.clone(), "text features": txt.clone(), "relevance": rel.copy()}
    args[which][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"^{which} contains NaN"):
        single_modal_ndcg(args["image features"], args["text features"], img2txt, args["relevance"])


def test_official_exclusion_gives_the_query_score_zero_not_one() -> None:
    """With positive scores the zero-scored query sinks to the end of its list (official mode)."""
    scores = np.array([[0.3, 0.9, 0.5], [0.4, 0.2, 0.6], [0.7, 0.8, 0.1]])
    rel = np.array([[1.0, 0.2, 0.9], [0.5, 1.0, 0.1], [0.3, 0.8, 1.0]])
    exclude = [0, 1, 2]
    zeroed = scores.copy()
    zeroed[np.arange(3), exclude] = 0.0
    rel_zeroed = rel.copy()
    rel_zeroed[np.arange(3), exclude] = 0.0
    got = ndcg_at_k(scores, rel, ks=(1, 2), exclude=exclude, exclude_by_zero_score=True)
    for k in (1, 2):
        assert got[k] == pytest.approx(_brute_ndcg(zeroed, rel_zeroed, k), abs=1e-4)  # inputs go through float32


def test_ks_and_empty_inputs_are_checked_and_a_one_item_gallery_works() -> None:
    with pytest.raises(ValueError, match="ks must be positive"):
        ndcg_at_k(np.zeros((2, 3)), np.zeros((2, 3)), ks=(0, 5))
    with pytest.raises(ValueError, match="empty"):
        ndcg_at_k(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="empty"):
        ndcg_at_k(np.zeros((3, 0)), np.zeros((3, 0)))
    assert ndcg_at_k(np.ones((2, 1)), np.ones((2, 1)), ks=(1, 10)) == {1: 100.0, 10: 100.0}


def test_scores_that_require_grad_are_accepted() -> None:
    scores = torch.tensor([[0.9, 0.1]], requires_grad=True)
    assert ndcg_at_k(scores, np.array([[1.0, 0.0]]), ks=(1,))[1] == 100.0


def test_protocols_use_the_caption_count_not_the_embedding_width_as_gallery_size() -> None:
    """2-d embeddings, 12 captions, NDCG@8: the t2t gallery holds 12 captions, the mixed ones 3 + 12 items."""
    img, txt, txt2img, img2txt, rel = _gallery(n=3, per=4, dim=2, seed=5)
    first = [c[0] for c in img2txt]
    single = single_modal_ndcg(img, txt, img2txt, rel, ks=(8,))
    t_scores = (txt[first] @ txt.T).numpy()
    assert single["t2t/NDCG@8"] == pytest.approx(_brute_ndcg(t_scores, rel.T, 8, first), abs=1e-4)
    mixed = mixed_ndcg(img, txt, img2txt, rel, ks=(8,))
    i_scores = torch.cat([img @ img.T, img @ txt.T], 1).numpy()
    i_rel = np.concatenate([rel[first], rel.T], 1)
    assert mixed["i2it/NDCG@8"] == pytest.approx(_brute_ndcg(i_scores, i_rel, 8), abs=1e-4)
