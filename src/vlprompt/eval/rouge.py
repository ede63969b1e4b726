"""ROUGE-L between captions and the graded caption-image relevance matrix RVLR's NDCG uses.

Definitions (coco-caption's ``Rouge`` scorer, the one TERN's and RVLR's ``{dataset}-rougeL.npy`` files come from):

* Tokens: lower-cased words with punctuation removed (coco-caption's PTB tokenizer differs only on contractions).
* One candidate ``c`` against a set of references ``R``: with ``LCS`` the longest common subsequence of tokens,
  ``P = max_r LCS(c, r) / |c|`` and ``Rc = max_r LCS(c, r) / |r|`` (each maximised over the references on its own),
  and ``ROUGE-L = (1 + b^2) P Rc / (Rc + b^2 P)`` with ``b = 1.2``; 0 when ``P`` or ``Rc`` is 0.
* Relevance ``Rel[c, j]`` = ROUGE-L of caption ``c`` against **all** captions of image ``j`` (shape
  ``[num_captions, num_images]``). A caption's own image therefore includes the caption itself, so
  ``Rel[c, image(c)] = 1``. The matrix is graded; nothing is thresholded.

The LCS table is computed for many caption pairs at once with NumPy (one vectorised step per candidate word:
row ``i`` of the dynamic programme is the running maximum of ``match ? above_left + 1 : above``), in blocks of
captions of similar length, so COCO-5K (25,000 x 25,000 pairs) never holds more than a block in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

BETA = 1.2
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
# Caption pairs per vectorised block (rows x columns); bounds the [rows, cols, words] int16 buffers.
_BLOCK = 384


def tokenize(caption: str) -> list[str]:
    """Lower-cased words without punctuation."""
    return _WORD.findall(caption.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (the plain dynamic programme)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, references: Sequence[str], beta: float = BETA) -> float:
    """Multi-reference ROUGE-L F-measure of ``candidate`` (coco-caption's definition, see the module docstring)."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    cand = tokenize(candidate)
    if not cand:
        return 0.0
    precision = recall = 0.0
    for ref in references:
        toks = tokenize(ref)
        if not toks:
            continue
        lcs = lcs_length(cand, toks)
        precision = max(precision, lcs / len(cand))
        recall = max(recall, lcs / len(toks))
    return _f_measure(precision, recall, beta)


def _f_measure(precision, recall, beta: float):
    num = (1 + beta**2) * precision * recall
    den = recall + beta**2 * precision
    if isinstance(den, np.ndarray):
        out = np.zeros_like(den, dtype=np.float64)
        np.divide(num, den, out=out, where=den > 0)
        return out
    return float(num / den) if den > 0 else 0.0


def _encode(tokens: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Word ids padded into ``[n, max_len]`` (pad -1) and the lengths."""
    vocab: dict[str, int] = {}
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    ids = np.full((len(tokens), max(1, int(lengths.max(initial=0)))), -1, dtype=np.int32)
    for i, toks in enumerate(tokens):
        ids[i, : len(toks)] = [vocab.setdefault(w, len(vocab)) for w in toks]
    return ids, lengths


def _lcs_block(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LCS lengths of every row of ``a`` ``[C, m]`` against every row of ``b`` ``[R, n]`` (padding never matches)."""
    b = np.where(b < 0, -2, b)  # a's padding is -1, b's -2: pads match nothing
    prev = np.zeros((a.shape[0], b.shape[0], b.shape[1] + 1), dtype=np.int16)
    for i in range(a.shape[1]):
        match = a[:, i, None, None] == b[None]
        step = np.where(match, prev[:, :, :-1] + 1, prev[:, :, 1:])
        prev = np.concatenate([prev[:, :, :1], np.maximum.accumulate(step, axis=2)], axis=2)
    return prev[:, :, -1]


def lcs_matrix(
    captions_a: Sequence[str], captions_b: Sequence[str], progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """``[len(a), len(b)]`` token-level LCS lengths (int32), computed in length-sorted blocks."""
    tok_a = [tokenize(c) for c in captions_a]
    tok_b = [tokenize(c) for c in captions_b]
    ids, len_a = _encode(tok_a + tok_b)
    ids_a, ids_b = ids[: len(tok_a)], ids[len(tok_a) :]
    len_b = len_a[len(tok_a) :]
    len_a = len_a[: len(tok_a)]
    order_a, order_b = np.argsort(len_a, kind="stable"), np.argsort(len_b, kind="stable")
    out = np.zeros((len(tok_a), len(tok_b)), dtype=np.int32)
    total = -(-len(tok_a) // _BLOCK)
    for done, start in enumerate(range(0, len(tok_a), _BLOCK)):
        rows = order_a[start : start + _BLOCK]
        m = max(1, int(len_a[rows].max()))
        for col_start in range(0, len(tok_b), _BLOCK):
            cols = order_b[col_start : col_start + _BLOCK]
            n = max(1, int(len_b[cols].max()))
            out[np.ix_(rows, cols)] = _lcs_block(ids_a[rows, :m], ids_b[cols, :n])
        if progress is not None:
            progress(done + 1, total)
    return out


def relevance_matrix(
    captions: Sequence[str],
    img2txt: Sequence[Sequence[int]],
    beta: float = BETA,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """``Rel[c, j]`` = ROUGE-L of caption ``c`` against all captions of image ``j``; float32 ``[C, N]``.

    ``img2txt[j]`` lists the caption indices of image ``j`` (the gallery's ground truth).
    """
    if not img2txt or any(len(refs) == 0 for refs in img2txt):
        raise ValueError("every image needs at least one caption to serve as its references")
    lengths = np.array([len(tokenize(c)) for c in captions], dtype=np.float64)
    rel = np.zeros((len(captions), len(img2txt)), dtype=np.float32)
    # columns grouped by image, so one reduceat takes each image's maximum over its references
    columns = np.concatenate([np.asarray(refs, dtype=np.int64) for refs in img2txt])
    group_starts = np.cumsum([0] + [len(refs) for refs in img2txt[:-1]])
    # Rows in chunks so COCO-5K holds one [chunk, 25k] LCS slab at a time, not the 25k x 25k table.
    chunk = 4 * _BLOCK
    starts = range(0, len(captions), chunk)
    for done, start in enumerate(starts):
        lcs = lcs_matrix(captions[start : start + chunk], captions).astype(np.float64)
        cand_len = lengths[start : start + chunk, None]
        prec = np.divide(lcs, cand_len, out=np.zeros_like(lcs), where=cand_len > 0)
        rec = np.divide(lcs, lengths[None], out=np.zeros_like(lcs), where=lengths[None] > 0)
        best_prec = np.maximum.reduceat(prec[:, columns], group_starts, axis=1)
        best_rec = np.maximum.reduceat(rec[:, columns], group_starts, axis=1)
        rel[start : start + chunk] = _f_measure(best_prec, best_rec, beta)
        if progress is not None:
            progress(done + 1, len(starts))
    return rel


def img2txt_from_txt2img(txt2img: Sequence[int], num_images: int | None = None) -> list[list[int]]:
    """Caption indices of each image from each caption's image index."""
    n = num_images if num_images is not None else (max(txt2img) + 1 if len(txt2img) else 0)
    out: list[list[int]] = [[] for _ in range(n)]
    for c, j in enumerate(txt2img):
        out[int(j)].append(c)
    return out
