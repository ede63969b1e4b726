"""NDCG@K with graded relevance, and RVLR's single-modal and mixed retrieval protocols.

Definitions (RVLR's ``metric.py`` / ``Retrieval.py``, spec part B5):

* One query: ``DCG@K = sum_{r=1..K} rel_r / log2(r + 1)`` over the ranked gallery, ``IDCG@K`` the same sum over
  the K largest relevances of the query's whole row, ``NDCG@K = DCG / IDCG`` (0 when ``IDCG`` is 0, never NaN).
  The reported value is the mean over queries x 100.
* Ranking: by descending score; equal scores keep gallery order (a stable sort), so the same inputs always give
  the same numbers.
* Relevance ``Rel[c, j]`` (``[num_captions, num_images]``, see :mod:`vlprompt.eval.rouge`); ``first(i)`` is the
  first caption of image ``i``.

Protocols (scores are cosine similarities of L2-normalised features throughout):

* ``i2i``: queries = the N images, gallery = the N images, ``rel(i -> j) = Rel[first(i), j]``; the query itself is
  excluded.
* ``t2t``: queries = ``first(i)`` for each image, gallery = all captions, ``rel(first(i) -> c) = Rel[c, i]``; the
  query caption itself is excluded.
* ``i2it`` (mixed): query image ``i``, gallery = images then captions, relevance ``[Rel[first(i), j] | Rel[c, i]]``.
* ``t2it`` (mixed): query ``first(i)``, gallery = captions then images, relevance ``[Rel[c, i] | Rel[first(i), j]]``.
  The mixed galleries contain the query itself (as in the reference code).

``official=True`` reproduces two quirks of the reference code (``metric.py``): self-exclusion sets the self score
to 0 (so the query still occupies a rank when other scores are negative) instead of removing it, and the image
part of ``t2it`` is transposed, scores and relevance alike: query ``first(i)`` sees image ``j`` with the score
``s(first(j), i)`` and the relevance ``Rel[first(j), i]`` (the reference slices ``scores_t2i.T[:, ::5]`` and
``Rel[::5].T``). The reference also mixes cosines with ITM logits in the mixed lists; a dual encoder has no ITM
head, so that quirk does not arise here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

KS = (10, 20, 50)
PROTOCOLS = ("single-modal", "mixed", "all")
_CHUNK = 512  # queries per step: bounds the [chunk, gallery] sort buffers


def _tensor(x, what: str) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(t.shape)}")
    t = t.float().cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or inf")
    return t


ChunkFn = Callable[[int, int], Tensor]


def _ndcg_chunked(
    scores: ChunkFn,
    relevance: ChunkFn,
    num_queries: int,
    num_gallery: int,
    ks: Sequence[int],
    exclude: Tensor | None,
    exclude_by_zero_score: bool,
) -> dict[int, float]:
    """NDCG from functions giving rows ``start:end`` of the score and relevance matrices (memory stays bounded)."""
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"empty score matrix ({num_queries}, {num_gallery})")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    k_max = min(max(int(k) for k in ks), num_gallery)
    discount = 1.0 / torch.log2(torch.arange(2, k_max + 2, dtype=torch.float64))
    totals = torch.zeros(k_max, dtype=torch.float64)
    for start in range(0, num_queries, _CHUNK):
        end = min(start + _CHUNK, num_queries)
        sc, rc = scores(start, end).double(), relevance(start, end).double()
        if exclude is not None:
            rows, cols = torch.arange(end - start), exclude[start:end]
            sc[rows, cols] = 0.0 if exclude_by_zero_score else -torch.inf
            rc[rows, cols] = 0.0
        order = torch.sort(sc, dim=1, descending=True, stable=True).indices[:, :k_max]
        dcg = torch.cumsum(rc.gather(1, order) * discount, dim=1)
        ideal = torch.sort(rc, dim=1, descending=True).values[:, :k_max]
        idcg = torch.cumsum(ideal * discount, dim=1)
        totals += torch.where(idcg > 0, dcg / idcg.clamp(min=1e-300), torch.zeros_like(dcg)).sum(0)
    means = 100.0 * totals / num_queries
    return {int(k): float(means[min(int(k), k_max) - 1]) for k in ks}


def ndcg_at_k(
    scores,
    relevance,
    ks: Sequence[int] = KS,
    exclude: Sequence[int] | None = None,
    exclude_by_zero_score: bool = False,
) -> dict[int, float]:
    """Mean NDCG@K x 100 for each K of ``ks``, from ``[Q, G]`` scores and relevances.

    ``exclude[q]`` is a gallery index removed from query ``q``'s list (its own entry); with
    ``exclude_by_zero_score`` it stays in the list with score 0 and relevance 0 (the reference code's way).
    """
    s, r = _tensor(scores, "scores"), _tensor(relevance, "relevance")
    if s.shape != r.shape:
        raise ValueError(f"scores {tuple(s.shape)} and relevance {tuple(r.shape)} differ in shape")
    ex = _exclude(exclude, s.shape[0])
    return _ndcg_chunked(lambda a, b: s[a:b], lambda a, b: r[a:b], *s.shape, ks, ex, exclude_by_zero_score)


def _exclude(exclude: Sequence[int] | None, num_queries: int) -> Tensor | None:
    if exclude is None:
        return None
    ex = torch.as_tensor(np.asarray(exclude), dtype=torch.long)
    if ex.shape != (num_queries,):
        raise ValueError(f"exclude needs one gallery index per query, got shape {tuple(ex.shape)}")
    return ex


def _keyed(direction: str, values: dict[int, float]) -> dict[str, float]:
    return {f"{direction}/NDCG@{k}": v for k, v in values.items()}


def _check(image_feats: Tensor, text_feats: Tensor, img2txt: Sequence[Sequence[int]], relevance: Tensor) -> None:
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    if relevance.shape != (n_txt, n_img):
        raise ValueError(
            f"relevance must be [num_captions, num_images] = ({n_txt}, {n_img}), got {tuple(relevance.shape)}"
        )
    if len(img2txt) != n_img or any(len(c) == 0 for c in img2txt):
        raise ValueError("img2txt needs one non-empty caption list per image")


def _inputs(image_feats, text_feats, img2txt, relevance) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    img, txt = _tensor(image_feats, "image features"), _tensor(text_feats, "text features")
    rel = _tensor(relevance, "relevance")
    _check(img, txt, img2txt, rel)
    first = torch.tensor([int(c[0]) for c in img2txt], dtype=torch.long)
    return img, txt, rel, first


def single_modal_ndcg(
    image_feats,
    text_feats,
    img2txt: Sequence[Sequence[int]],
    relevance,
    ks: Sequence[int] = KS,
    official: bool = False,
    visual: str = "i",
) -> dict[str, float]:
    """``i2i`` and ``t2t`` NDCG@K (see the module docstring); features are L2-normalised ``[N, E]`` / ``[C, E]``."""
    img, txt, rel, first = _inputs(image_feats, text_feats, img2txt, relevance)
    n, c = img.shape[0], txt.shape[0]
    rel_t = rel.T  # [N, C]: Rel[c, i] read by query image i
    i2i = _ndcg_chunked(
        lambda a, b: img[a:b] @ img.T, lambda a, b: rel[first[a:b]], n, n, ks, torch.arange(n), official
    )
    t2t = _ndcg_chunked(lambda a, b: txt[first[a:b]] @ txt.T, lambda a, b: rel_t[a:b], n, c, ks, first, official)
    return {**_keyed(f"{visual}2{visual}", i2i), **_keyed("t2t", t2t)}


def mixed_ndcg(
    image_feats,
    text_feats,
    img2txt: Sequence[Sequence[int]],
    relevance,
    ks: Sequence[int] = KS,
    official: bool = False,
    visual: str = "i",
) -> dict[str, float]:
    """``i2it`` and ``t2it`` NDCG@K over pooled galleries of images and captions (see the module docstring)."""
    img, txt, rel, first = _inputs(image_feats, text_feats, img2txt, relevance)
    n, c = img.shape[0], txt.shape[0]
    first_rel = rel[first]  # [N, N]: first caption of image a against the references of image b
    image_part = first_rel.T if official else first_rel  # the reference code transposes it in t2it
    rel_t = rel.T
    firsts = txt[first]

    def i_scores(a: int, b: int) -> Tensor:
        return torch.cat([img[a:b] @ img.T, img[a:b] @ txt.T], dim=1)

    def t_scores(a: int, b: int) -> Tensor:
        q = firsts[a:b]
        # official: the reference transposes the t2i scores too, so row i holds s(first(j), i) for image j
        to_images = img[a:b] @ firsts.T if official else q @ img.T
        return torch.cat([q @ txt.T, to_images], dim=1)

    i2it = _ndcg_chunked(i_scores, lambda a, b: torch.cat([first_rel[a:b], rel_t[a:b]], 1), n, n + c, ks, None, False)
    t2it = _ndcg_chunked(t_scores, lambda a, b: torch.cat([rel_t[a:b], image_part[a:b]], 1), n, n + c, ks, None, False)
    return {**_keyed(f"{visual}2{visual}t", i2it), **_keyed(f"t2{visual}t", t2it)}


def modal_balance_metrics(
    image_feats,
    text_feats,
    txt2img: Sequence[int],
    relevance,
    protocol: str = "all",
    ks: Sequence[int] = KS,
    official: bool = False,
    visual: str = "i",
) -> dict[str, float]:
    """NDCG@K of ``protocol`` (``single-modal``, ``mixed`` or ``all``) from features and caption->image links."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    img2txt: list[list[int]] = [[] for _ in range(len(image_feats))]
    for c, j in enumerate(txt2img):
        img2txt[int(j)].append(c)
    out: dict[str, float] = {}
    if protocol in ("single-modal", "all"):
        out.update(single_modal_ndcg(image_feats, text_feats, img2txt, relevance, ks, official, visual))
    if protocol in ("mixed", "all"):
        out.update(mixed_ndcg(image_feats, text_feats, img2txt, relevance, ks, official, visual))
    return out
