"""Retrieval metrics: R@K, median rank (MdR), mean rank (MnR) and rsum, with several ground truths per query.

Definitions (the usual CLIP4Clip / DGL / ALBEF ones, with ties made explicit):

* The rank of a query is the 0-based position of its best-scoring ground-truth item in the gallery:
  ``rank = #{gallery items scoring strictly higher than the best ground-truth score}``.
  Ties with the ground truth do *not* count against it (``ties="optimistic"``, the default).
* ``ties="pessimistic"`` places the best ground truth *after* every non-ground-truth item that ties with it:
  ``rank = #{items scoring > best} + #{non-ground-truth items scoring == best}``. Other ground truths that tie
  with the best one never count (they are correct answers too). With one ground truth this is
  ``#{items scoring >= gt} - 1``.
* ``R@K = 100 * mean(rank < K)``, ``MdR = median(rank) + 1``, ``MnR = mean(rank) + 1``,
  ``rsum`` = the sum of R@1, R@5 and R@10 over both directions.

The CLIP4Clip / DGL reference code (``compute_metrics`` with ``np.where`` on a sorted matrix) emits one row per
tied position, so a query whose ground truth ties with another item is counted several times (1,012 rows for
1,000 MSR-VTT queries). We do not reproduce that: every query counts exactly once.

Similarities can be given whole (``ranks_from_similarity``) or built chunk by chunk from features
(``ranks_from_features``) so a 100k x 100k matrix never exists in memory.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from vlprompt.eval.scores import similarity

Ties = Literal["optimistic", "pessimistic"]
# None (diagonal), one gallery index per query, or a list of gallery indices per query.
GroundTruth = Any

_TIES = ("optimistic", "pessimistic")
# Rows of an already materialised similarity matrix handled at once; bounds the boolean comparison buffers.
_SIM_CHUNK = 1024


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        with warnings.catch_warnings():
            # Read-only arrays (np.load with mmap_mode) are fine: we never write to them, and copying could be huge.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(np.asarray(x))
    except TypeError as err:  # object arrays, strings
        raise ValueError(f"{what} must be a numeric tensor or array, got {type(x).__name__}") from err


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def _gt_lists(gt: GroundTruth, num_queries: int) -> list[np.ndarray]:
    """Turn any accepted ground-truth form into one int64 array per query (unvalidated ranges)."""
    if isinstance(gt, torch.Tensor):
        gt = gt.detach().cpu().numpy()
    if isinstance(gt, np.ndarray) and gt.dtype == object and gt.ndim == 1:
        gt = list(gt)  # ragged lists stored as an object array
    if isinstance(gt, np.ndarray):
        if gt.dtype.kind not in "iu":
            raise ValueError(f"ground truth must hold integer indices, got dtype {gt.dtype}")
        if gt.ndim == 1:
            rows = list(gt.astype(np.int64).reshape(-1, 1))
        elif gt.ndim == 2:
            rows = list(gt.astype(np.int64))
        else:
            raise ValueError(f"ground truth array must be 1-D or 2-D, got shape {tuple(gt.shape)}")
    elif isinstance(gt, Sequence) and not isinstance(gt, str | bytes):
        rows = []
        for i, item in enumerate(gt):
            if _is_int(item):
                rows.append(np.array([int(item)], dtype=np.int64))
            elif isinstance(item, Sequence | np.ndarray | torch.Tensor) and not isinstance(item, str | bytes):
                values = list(item.tolist() if isinstance(item, np.ndarray | torch.Tensor) else item)
                if not all(_is_int(v) for v in values):
                    raise ValueError(f"ground truth of query {i} must be integer indices, got {values!r}")
                rows.append(np.array(values, dtype=np.int64))
            else:
                raise ValueError(f"ground truth of query {i} must be an int or a list of ints, got {item!r}")
    else:
        raise ValueError(f"ground truth must be None, a sequence of ints or a list of lists, got {type(gt).__name__}")
    if len(rows) != num_queries:
        raise ValueError(f"ground truth has {len(rows)} entries but there are {num_queries} queries")
    return rows


def _single_gt(gt: Any) -> np.ndarray | None:
    """``gt`` as an int64 array if it holds exactly one index per query, else None."""
    if isinstance(gt, np.ndarray):
        return gt.astype(np.int64) if gt.ndim == 1 and gt.dtype.kind in "iu" else None
    if isinstance(gt, Sequence) and not isinstance(gt, str | bytes) and all(_is_int(v) for v in gt):
        return np.array([int(v) for v in gt], dtype=np.int64)
    return None


def _gt_csr(gt: GroundTruth, num_queries: int, num_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ground truth as (row pointers [num_queries + 1], gallery indices), duplicates removed."""
    if gt is None:
        if num_queries != num_gallery:
            raise ValueError(
                f"ground truth None means the diagonal, which needs a square matrix; got {num_queries} queries "
                f"and {num_gallery} gallery items"
            )
        return np.arange(num_queries + 1, dtype=np.int64), np.arange(num_queries, dtype=np.int64)
    if isinstance(gt, torch.Tensor):
        gt = gt.detach().cpu().numpy()
    flat = _single_gt(gt)
    if flat is not None:  # fast path for the common one-gt-per-query case (100k queries)
        if flat.size != num_queries:
            raise ValueError(f"ground truth has {flat.size} entries but there are {num_queries} queries")
        bad = np.flatnonzero((flat < 0) | (flat >= num_gallery))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"ground truth of query {i} is {int(flat[i])}, outside the gallery range [0, {num_gallery})"
            )
        return np.arange(num_queries + 1, dtype=np.int64), flat
    rows = _gt_lists(gt, num_queries)
    # Duplicated indices would be counted twice as tied ground truths under the pessimistic rule.
    rows = [np.unique(r) for r in rows]
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"query {i} has no ground truth")
        if r[0] < 0 or r[-1] >= num_gallery:
            bad = int(r[0] if r[0] < 0 else r[-1])
            raise ValueError(f"ground truth of query {i} is {bad}, outside the gallery range [0, {num_gallery})")
    ptr = np.zeros(num_queries + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([r.size for r in rows])
    idx = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return ptr, idx


def invert_ground_truth(gt: GroundTruth, num_queries: int, num_gallery: int) -> list[list[int]]:
    """Ground truth of the reverse direction: for each gallery item, the queries that have it as a ground truth."""
    ptr, idx = _gt_csr(gt, num_queries, num_gallery)
    inverse: list[list[int]] = [[] for _ in range(num_gallery)]
    for q in range(num_queries):
        for g in idx[ptr[q] : ptr[q + 1]]:
            inverse[int(g)].append(q)
    empty = [g for g, qs in enumerate(inverse) if not qs]
    if empty:
        raise ValueError(
            f"{len(empty)} gallery item(s) are the ground truth of no query (first: {empty[0]}), "
            "so the reverse direction cannot be evaluated"
        )
    return inverse


def _chunk_ranks(sim: torch.Tensor, start: int, ptr: np.ndarray, idx: np.ndarray, ties: str) -> torch.Tensor:
    """Ranks of queries ``start .. start + len(sim)`` given their similarity rows."""
    if not bool(torch.isfinite(sim).all()):
        raise ValueError(f"similarities of queries {start}..{start + sim.shape[0] - 1} contain NaN or inf")
    n = sim.shape[0]
    lo, hi = int(ptr[start]), int(ptr[start + n])
    counts = torch.from_numpy(np.diff(ptr[start : start + n + 1])).to(sim.device)
    rows = torch.repeat_interleave(torch.arange(n, device=sim.device), counts)
    cols = torch.from_numpy(idx[lo:hi]).to(sim.device)
    gt_scores = sim[rows, cols]
    best = torch.full((n,), -torch.inf, dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, rows, gt_scores, reduce="amax")
    if ties == "optimistic":
        return (sim > best[:, None]).sum(dim=1)
    # Every item scoring >= best, minus the ground truths among them (those tie with best exactly).
    tied_gts = torch.zeros(n, dtype=torch.int64, device=sim.device)
    tied_gts = tied_gts.scatter_add(0, rows, (gt_scores == best[rows]).long())
    return (sim >= best[:, None]).sum(dim=1) - tied_gts


def ranks_from_similarity(sim: Any, gt: GroundTruth = None, ties: Ties = "optimistic") -> np.ndarray:
    """0-based rank of each query's best ground truth, from a [num_queries, num_gallery] similarity matrix."""
    _check_ties(ties)
    sim_t = _as_tensor(sim, "similarity")
    if sim_t.ndim != 2:
        raise ValueError(f"similarity must be 2-D [num_queries, num_gallery], got shape {tuple(sim_t.shape)}")
    if not sim_t.is_floating_point():
        if sim_t.dtype == torch.bool or sim_t.is_complex():
            raise ValueError(f"similarity must be real-valued, got dtype {sim_t.dtype}")
        sim_t = sim_t.double()
    num_queries, num_gallery = sim_t.shape
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"similarity matrix is empty: shape {tuple(sim_t.shape)}")
    ptr, idx = _gt_csr(gt, num_queries, num_gallery)
    out = []
    with torch.no_grad():
        for start in range(0, num_queries, _SIM_CHUNK):
            out.append(_chunk_ranks(sim_t[start : start + _SIM_CHUNK], start, ptr, idx, ties).cpu())
    return torch.cat(out).numpy().astype(np.int64)


def ranks_from_features(
    query_feats: Any,
    gallery_feats: Any,
    gt: GroundTruth = None,
    chunk_size: int = 1024,
    ties: Ties = "optimistic",
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Ranks from dot products ``query @ gallery.T``, computed ``chunk_size`` queries at a time.

    Features are used as given: L2-normalise them first for cosine similarity. The gallery is moved to the
    query device. Products are summed in float64 and compared in ``dtype``: float32 (the default) makes equal
    features tie on every BLAS kernel (:mod:`vlprompt.eval.scores`); float64 keeps the finer differences.
    """
    _check_ties(ties)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    q = _as_tensor(query_feats, "query features")
    g = _as_tensor(gallery_feats, "gallery features")
    if q.ndim != 2 or g.ndim != 2:
        raise ValueError(f"features must be 2-D [count, dim]; got query {tuple(q.shape)} and gallery {tuple(g.shape)}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: query {q.shape[1]} vs gallery {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"no features: {q.shape[0]} queries, {g.shape[0]} gallery items")
    ptr, idx = _gt_csr(gt, q.shape[0], g.shape[0])
    g = g.to(device=q.device)
    out = []
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk_size):
            sim = similarity(q[start : start + chunk_size], g, dtype)
            out.append(_chunk_ranks(sim, start, ptr, idx, ties).cpu())
    return torch.cat(out).numpy().astype(np.int64)


def retrieval_metrics(ranks: Any, prefix: str, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K for each K in ``ks``, MdR and MnR from 0-based ranks, keyed ``f"{prefix}/R@1"`` etc."""
    r = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    if r.dtype.kind not in "iu" or (r < 0).any():
        raise ValueError("ranks must be non-negative integers (0 = ground truth first)")
    if not all(_is_int(k) and k > 0 for k in ks):
        raise ValueError(f"ks must be positive ints, got {tuple(ks)!r}")
    r = r.astype(np.int64)
    n = r.size
    head = f"{prefix}/" if prefix else ""
    out: dict[str, float] = {}
    # Integer counts divided once, so 814 hits of 1000 print as 81.4 rather than 81.39999999999999.
    for k in ks:
        out[f"{head}R@{k}"] = 100.0 * int((r < k).sum()) / n
    out[f"{head}MdR"] = float(np.median(r)) + 1.0
    out[f"{head}MnR"] = float(int(r.sum()) + n) / n
    return out


def _check_names(names: Sequence[str]) -> tuple[str, str]:
    if len(names) != 2 or not all(isinstance(x, str) and x for x in names):
        raise ValueError(f"names must be two non-empty strings such as ('t2i', 'i2t'), got {names!r}")
    return names[0], names[1]


def _rsum(metrics: dict[str, float], fwd: str, bwd: str) -> float:
    return sum(metrics[f"{d}/R@{k}"] for d in (fwd, bwd) for k in (1, 5, 10))


def bidirectional_metrics(
    text_feats: Any,
    image_feats: Any,
    txt2img: GroundTruth,
    img2txt: GroundTruth = None,
    names: Sequence[str] = ("t2i", "i2t"),
    chunk_size: int = 1024,
    ties: Ties = "optimistic",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Text-to-image and image-to-text metrics plus rsum, from features, without building the full matrix.

    ``txt2img[i]`` is the image of text ``i`` (None: text i <-> image i). ``img2txt`` defaults to every text
    of each image, derived from ``txt2img``.
    """
    fwd, bwd = _check_names(names)
    num_texts, num_images = len(text_feats), len(image_feats)
    if img2txt is None:
        img2txt = None if txt2img is None else invert_ground_truth(txt2img, num_texts, num_images)
    t2i = ranks_from_features(text_feats, image_feats, txt2img, chunk_size=chunk_size, ties=ties, dtype=dtype)
    i2t = ranks_from_features(image_feats, text_feats, img2txt, chunk_size=chunk_size, ties=ties, dtype=dtype)
    out = {**retrieval_metrics(t2i, fwd), **retrieval_metrics(i2t, bwd)}
    out["rsum"] = _rsum(out, fwd, bwd)
    return out


def bidirectional_metrics_from_similarity(
    sim_t2i: Any,
    txt2img: GroundTruth,
    img2txt: GroundTruth = None,
    names: Sequence[str] = ("t2i", "i2t"),
    ties: Ties = "optimistic",
) -> dict[str, float]:
    """Both directions plus rsum from a [num_texts, num_images] similarity matrix (its transpose for i2t)."""
    fwd, bwd = _check_names(names)
    sim = _as_tensor(sim_t2i, "similarity")
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [num_texts, num_images], got shape {tuple(sim.shape)}")
    if img2txt is None and txt2img is not None:
        img2txt = invert_ground_truth(txt2img, sim.shape[0], sim.shape[1])
    out = {
        **retrieval_metrics(ranks_from_similarity(sim, txt2img, ties=ties), fwd),
        **retrieval_metrics(ranks_from_similarity(sim.T, img2txt, ties=ties), bwd),
    }
    out["rsum"] = _rsum(out, fwd, bwd)
    return out
