"""Retrieval metrics: the published MSR-VTT fixture, a brute-force reference, ties, chunking and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprompt.eval import (
    bidirectional_metrics,
    bidirectional_metrics_from_similarity,
    invert_ground_truth,
    ranks_from_features,
    ranks_from_similarity,
    retrieval_metrics,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
MSRVTT_SIM = FIXTURES / "msrvtt_1kA_vit16_t2v_sim.npy"


def _approx(metrics: dict[str, float], expected: dict[str, float]) -> None:
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def _brute_force_ranks(sim: np.ndarray, gts: list[list[int]], ties: str) -> np.ndarray:
    """Slow, obvious definition: position of the best ground truth in the list of candidates."""
    ranks = []
    for q, row in enumerate(sim):
        best = max(row[g] for g in gts[q])
        rank = 0
        for j, score in enumerate(row):
            if score > best or (ties == "pessimistic" and score == best and j not in gts[q]):
                rank += 1
        ranks.append(rank)
    return np.array(ranks)


@pytest.fixture(scope="module")
def msrvtt_sim() -> np.ndarray:
    if not MSRVTT_SIM.is_file():
        pytest.skip(f"fixture not found: {MSRVTT_SIM}")
    return np.load(MSRVTT_SIM)


def test_msrvtt_fixture_text_to_video(msrvtt_sim: np.ndarray) -> None:
    metrics = retrieval_metrics(ranks_from_similarity(msrvtt_sim), "t2v")
    _approx(metrics, {"t2v/R@1": 48.0, "t2v/R@5": 71.3, "t2v/R@10": 81.4, "t2v/MdR": 2.0, "t2v/MnR": 13.649})


def test_msrvtt_fixture_video_to_text(msrvtt_sim: np.ndarray) -> None:
    metrics = retrieval_metrics(ranks_from_similarity(msrvtt_sim.T), "v2t")
    _approx(metrics, {"v2t/R@1": 46.9, "v2t/R@5": 74.9, "v2t/R@10": 83.7, "v2t/MdR": 2.0, "v2t/MnR": 9.779})


def test_msrvtt_fixture_pessimistic_ties(msrvtt_sim: np.ndarray) -> None:
    metrics = retrieval_metrics(ranks_from_similarity(msrvtt_sim.T, ties="pessimistic"), "v2t")
    assert metrics["v2t/R@1"] == pytest.approx(46.5)
    assert metrics["v2t/MnR"] == pytest.approx(9.791)
    # One query per video, never the reference's 1,012 rows for tied positions.
    assert ranks_from_similarity(msrvtt_sim.T).shape == (1000,)


def test_msrvtt_fixture_bidirectional(msrvtt_sim: np.ndarray) -> None:
    metrics = bidirectional_metrics_from_similarity(torch.from_numpy(msrvtt_sim), None, names=("t2v", "v2t"))
    assert metrics["t2v/R@1"] == pytest.approx(48.0)
    assert metrics["v2t/MnR"] == pytest.approx(9.779)
    assert metrics["rsum"] == pytest.approx(48.0 + 71.3 + 81.4 + 46.9 + 74.9 + 83.7)


def test_ties_on_a_tiny_matrix() -> None:
    sim = np.array(
        [
            [0.5, 0.5, 0.1, 0.9],  # gt 0 ties with item 1, item 3 is higher
            [0.2, 0.7, 0.7, 0.7],  # gt 1 ties with two items
            [0.3, 0.1, 0.3, 0.0],  # gt 2 ties with item 0 only
            [0.0, 0.1, 0.2, 0.3],  # gt 3 wins outright
        ],
        dtype=np.float32,
    )
    assert ranks_from_similarity(sim).tolist() == [1, 0, 0, 0]
    assert ranks_from_similarity(sim, ties="pessimistic").tolist() == [2, 2, 1, 0]
    # A second ground truth tied with the best one is a correct answer, never a competitor.
    gts = [[0, 1], [1, 2], [2], [3]]
    assert ranks_from_similarity(sim, gts, ties="pessimistic").tolist() == [1, 1, 1, 0]
    assert ranks_from_similarity(sim, gts).tolist() == [1, 0, 0, 0]


def test_metric_formulas() -> None:
    ranks = np.array([0, 0, 3, 4, 9, 20])
    metrics = retrieval_metrics(ranks, "t2i", ks=(1, 5, 10))
    _approx(
        metrics,
        {
            "t2i/R@1": 100 * 2 / 6,
            "t2i/R@5": 100 * 4 / 6,
            "t2i/R@10": 100 * 5 / 6,
            "t2i/MdR": 3.5 + 1,
            "t2i/MnR": 36 / 6 + 1,
        },
    )
    assert retrieval_metrics(torch.tensor([2, 0]), "x", ks=(1, 3)) == {
        "x/R@1": 50.0,
        "x/R@3": 100.0,
        "x/MdR": 2.0,
        "x/MnR": 2.0,
    }


def _random_multi_gt(rng: np.random.Generator, num_texts: int, num_images: int) -> np.ndarray:
    # Every image gets at least one text, then the rest at random: like COCO's ~5 captions per image.
    txt2img = np.concatenate([np.arange(num_images), rng.integers(0, num_images, num_texts - num_images)])
    return rng.permutation(txt2img)


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_chunked_features_match_brute_force(ties: str) -> None:
    rng = np.random.default_rng(0)
    num_texts, num_images, dim = 53, 17, 8
    # Coarse values make exact ties frequent, so the tie rule is really exercised.
    text = rng.integers(-2, 3, (num_texts, dim)).astype(np.float32)
    image = rng.integers(-2, 3, (num_images, dim)).astype(np.float32)
    txt2img = _random_multi_gt(rng, num_texts, num_images)
    img2txt = [np.flatnonzero(txt2img == i).tolist() for i in range(num_images)]
    sim = text @ image.T

    expected_t2i = _brute_force_ranks(sim, [[int(i)] for i in txt2img], ties)
    expected_i2t = _brute_force_ranks(sim.T, img2txt, ties)
    if ties == "pessimistic":  # the data must really contain ties for this test to mean anything
        assert (expected_i2t != _brute_force_ranks(sim.T, img2txt, "optimistic")).any()
    for chunk in (1, 7, 1000):
        t2i = ranks_from_features(text, image, txt2img, chunk_size=chunk, ties=ties)
        i2t = ranks_from_features(image, text, img2txt, chunk_size=chunk, ties=ties)
        np.testing.assert_array_equal(t2i, expected_t2i)
        np.testing.assert_array_equal(i2t, expected_i2t)
        assert t2i.dtype == np.int64
    np.testing.assert_array_equal(ranks_from_similarity(torch.from_numpy(sim.T), img2txt, ties=ties), expected_i2t)


def test_chunk_size_and_query_order_independence() -> None:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(300, 32), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(60, 32), dim=-1)
    txt2img = torch.arange(300) % 60
    reference = ranks_from_features(text, image, txt2img, chunk_size=300)
    for chunk in (1, 7, 64, 1000):
        np.testing.assert_array_equal(ranks_from_features(text, image, txt2img, chunk_size=chunk), reference)
    perm = torch.randperm(300)
    shuffled = ranks_from_features(text[perm], image, txt2img[perm], chunk_size=7)
    np.testing.assert_array_equal(shuffled, reference[perm.numpy()])
    np.testing.assert_array_equal(
        ranks_from_features(text, image, txt2img, dtype=torch.float64),
        ranks_from_similarity(text.double() @ image.double().T, txt2img),
    )


def test_bidirectional_metrics_and_rsum() -> None:
    rng = np.random.default_rng(1)
    text = rng.standard_normal((40, 16)).astype(np.float32)
    image = rng.standard_normal((8, 16)).astype(np.float32)
    txt2img = np.arange(40) // 5  # five captions per image
    metrics = bidirectional_metrics(text, image, txt2img.tolist(), chunk_size=3)
    assert set(metrics) == {f"{d}/{m}" for d in ("t2i", "i2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")} | {
        "rsum"
    }
    assert metrics["rsum"] == pytest.approx(sum(metrics[f"{d}/R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))
    from_sim = bidirectional_metrics_from_similarity(text @ image.T, txt2img)
    assert from_sim == pytest.approx(metrics)
    # Explicit img2txt gives the same as the derived one; names rename the keys.
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(8)]
    renamed = bidirectional_metrics(torch.from_numpy(text), torch.from_numpy(image), txt2img, img2txt, ("t2v", "v2t"))
    assert renamed["v2t/MnR"] == pytest.approx(metrics["i2t/MnR"])
    assert renamed["rsum"] == pytest.approx(metrics["rsum"])


def test_invert_ground_truth() -> None:
    assert invert_ground_truth([1, 0, 1], 3, 2) == [[1], [0, 2]]
    assert invert_ground_truth([[0, 1], [1]], 2, 2) == [[0], [0, 1]]
    with pytest.raises(ValueError, match="ground truth of no query"):
        invert_ground_truth([0, 0], 2, 2)


def test_duplicate_ground_truth_indices_are_ignored() -> None:
    sim = np.array([[0.5, 0.5, 0.9]])
    assert ranks_from_similarity(sim, [[0, 0, 1]], ties="pessimistic").tolist() == [1]


@pytest.mark.parametrize(
    ("sim", "gt", "message"),
    [
        (np.zeros((2, 3)), None, "square"),
        (np.zeros(3), None, "2-D"),
        (np.zeros((0, 3)), [], "empty"),
        (np.zeros((2, 3)), [0], "2 queries"),
        (np.zeros((2, 3)), [0, 3], "outside the gallery range"),
        (np.zeros((2, 3)), [0, -1], "outside the gallery range"),
        (np.zeros((2, 3)), [[0], []], "no ground truth"),
        (np.zeros((2, 3)), [[0], [1, 5]], "outside the gallery range"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), "integer"),
        (np.zeros((2, 3)), [[0], ["a"]], "integer"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), None, "NaN"),
    ],
)
def test_bad_input_raises(sim: np.ndarray, gt: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranks_from_similarity(sim, gt)


def test_bad_arguments_raise() -> None:
    feats = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="ties"):
        ranks_from_similarity(np.zeros((2, 2)), ties="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature dims"):
        ranks_from_features(feats, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="chunk_size"):
        ranks_from_features(feats, feats, chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        ranks_from_features(feats, feats, dtype=torch.float16)
    with pytest.raises(ValueError, match="non-negative"):
        retrieval_metrics(np.array([0, -1]), "t2i")
    with pytest.raises(ValueError, match="non-empty"):
        retrieval_metrics(np.array([], dtype=np.int64), "t2i")
    with pytest.raises(ValueError, match="names"):
        bidirectional_metrics_from_similarity(np.zeros((2, 2)), None, names=("t2i",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu() -> None:
    torch.manual_seed(0)
    text, image = torch.randn(100, 16), torch.randn(20, 16)
    txt2img = torch.arange(100) % 20
    cpu = bidirectional_metrics(text, image, txt2img, chunk_size=16)
    gpu = bidirectional_metrics(text.cuda(), image.cuda(), txt2img.cuda(), chunk_size=16)
    assert gpu == pytest.approx(cpu)


@pytest.mark.parametrize("d", [64, 512])
@pytest.mark.parametrize("m", [33, 301])
def test_copies_of_the_ground_truth_tie_on_every_kernel(d: int, m: int) -> None:
    # Two copies of the ground-truth item must tie with it exactly, whatever GEMM blocking the BLAS kernel used:
    # pessimistic ranks then sit exactly 2 behind optimistic ones (float32 products broke this for some queries).
    g = np.random.default_rng(0).standard_normal((m, d)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[[m // 2, m - 1]] = g[1]
    queries = g[:8]
    for chunk in (1, 8):
        opt = ranks_from_features(queries, g, [1] * 8, chunk_size=chunk)
        pes = ranks_from_features(queries, g, [1] * 8, chunk_size=chunk, ties="pessimistic")
        np.testing.assert_array_equal(pes - opt, 2)


def _near_tie_features() -> torch.Tensor:
    """Two rows: query 0 ties exactly with both items; query 1 beats the other item by 1e-8, which float32 rounds
    away (1 + 1e-8 -> 1.0) and float64 keeps. Used as texts and as images, ground truth on the diagonal."""
    return torch.tensor([[1.0, 0.0], [1.0, 1e-4]])


def test_bidirectional_metrics_pass_ties_and_dtype_to_both_directions() -> None:
    x = _near_tie_features()
    r1 = {d: f"{d}/R@1" for d in ("t2i", "i2t")}
    optimistic = bidirectional_metrics(x, x, None)
    pessimistic = bidirectional_metrics(x, x, None, ties="pessimistic")
    fine = bidirectional_metrics(x, x, None, ties="pessimistic", dtype=torch.float64)
    for key in r1.values():
        assert optimistic[key] == 100.0  # ties never count against the ground truth
        assert pessimistic[key] == 0.0  # both queries tie in float32
        assert fine[key] == 50.0  # float64 separates query 1's near tie


def test_bidirectional_from_similarity_passes_ties_and_keeps_a_given_img2txt() -> None:
    sim = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert bidirectional_metrics_from_similarity(sim, None, ties="pessimistic")["t2i/R@1"] == 50.0
    assert bidirectional_metrics_from_similarity(sim, None, ties="pessimistic")["i2t/R@1"] == 50.0
    assert bidirectional_metrics_from_similarity(sim, None)["i2t/R@1"] == 100.0
    # an explicit img2txt wins over the inverse of txt2img: image 0's ground truth is text 1 (score 0 < 1)
    out = bidirectional_metrics_from_similarity(sim, [0, 1], img2txt=[[1], [1]])
    assert out["i2t/R@1"] == 50.0
    assert bidirectional_metrics_from_similarity(sim, [0, 1])["i2t/R@1"] == 100.0


def test_integer_similarities_rank_like_floats_and_bool_is_rejected() -> None:
    sim = np.array([[3, 5, 1], [2, 2, 7], [0, 9, 9]])
    floats = ranks_from_similarity(sim.astype(float), [0, 1, 2])
    assert ranks_from_similarity(sim, [0, 1, 2]).tolist() == floats.tolist() == [1, 1, 0]
    assert ranks_from_similarity(sim, [0, 1, 2], ties="pessimistic").tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="real-valued"):
        ranks_from_similarity(np.eye(2, dtype=bool))
    with pytest.raises(ValueError, match="^similarity must be a numeric"):
        ranks_from_similarity(np.array([["a", "b"]], dtype=object))
    with pytest.raises(ValueError, match="^similarity must be a numeric"):
        bidirectional_metrics_from_similarity(np.array([["a", "b"]], dtype=object), None)


def test_empty_similarity_is_rejected_but_one_gallery_item_is_fine() -> None:
    for shape in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="empty"):
            ranks_from_similarity(np.zeros(shape), [0, 0, 0] if shape[0] else [])
    assert ranks_from_similarity(np.array([[0.5], [0.1]]), [0, 0]).tolist() == [0, 0]


def test_direction_names_must_be_two_non_empty_strings() -> None:
    x = _near_tie_features()
    for names in (("t2i", ""), ("t2i", 1), ("t2i",)):
        with pytest.raises(ValueError, match="names must be"):
            bidirectional_metrics(x, x, None, names=names)


def test_two_dimensional_ground_truth_arrays_are_lists_of_ground_truths() -> None:
    """A ``[num_queries, k]`` integer array means k ground truths per query, not num_queries * k single ones."""
    sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.4]])
    as_array = ranks_from_similarity(sim, np.array([[0, 2], [1, 2]]))
    assert as_array.tolist() == ranks_from_similarity(sim, [[0, 2], [1, 2]]).tolist() == [1, 1]


def test_ground_truth_equal_to_the_gallery_size_is_out_of_range() -> None:
    sim = np.zeros((2, 3))
    for gt in ([[0], [3]], [[0, 3], [1]]):
        with pytest.raises(ValueError, match="outside the gallery range"):
            ranks_from_similarity(sim, gt)


def test_feature_inputs_are_checked_and_single_items_work() -> None:
    with pytest.raises(ValueError, match="^query features must be a numeric"):
        ranks_from_features(np.array([["a"]], dtype=object), np.ones((1, 1)))
    with pytest.raises(ValueError, match="^gallery features must be a numeric"):
        ranks_from_features(np.ones((1, 1)), np.array([["a"]], dtype=object))
    with pytest.raises(ValueError, match="2-D"):
        ranks_from_features(np.ones((2, 3)), np.ones(3), [0, 0])
    with pytest.raises(ValueError, match="no features"):
        ranks_from_features(np.ones((2, 3)), np.ones((0, 3)), [0, 0])
    assert ranks_from_features(np.ones((1, 3)), np.ones((1, 3)), [0]).tolist() == [0]  # one query, one item
    near = _near_tie_features()
    assert ranks_from_features(near, near, None, ties="pessimistic", dtype=torch.float64).tolist() == [1, 0]


def test_read_only_arrays_are_used_without_a_warning() -> None:
    sim = np.array([[0.9, 0.1], [0.2, 0.8]])
    sim.setflags(write=False)  # as np.load(..., mmap_mode="r") gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ranks_from_similarity(sim).tolist() == [0, 0]


def test_retrieval_metrics_ks_and_empty_prefix() -> None:
    assert set(retrieval_metrics([0, 3], "")) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
    for ks in ((0, 5), (1.5,)):
        with pytest.raises(ValueError, match="ks must be positive ints"):
            retrieval_metrics([0, 3], "t2i", ks=ks)


def test_every_accepted_ground_truth_form_gives_the_same_ranks() -> None:
    """Mixed ints and lists, ragged object arrays, per-query arrays or tensors: one ground-truth set per query."""
    sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.4]])
    expected = ranks_from_similarity(sim, [[1], [0, 2]]).tolist()
    forms = [
        [1, [0, 2]],
        np.array([[1], [0, 2]], dtype=object),
        [np.array([1]), np.array([0, 2])],
        [torch.tensor([1]), torch.tensor([0, 2])],
    ]
    for gt in forms:
        assert ranks_from_similarity(sim, gt).tolist() == expected == [0, 0]
    for bad in (5, [[0], 1.5], [[0], ["a"]]):
        with pytest.raises(ValueError, match="ground truth"):
            ranks_from_similarity(sim, bad)
