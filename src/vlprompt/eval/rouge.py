"""ROUGE-L between captions and the graded caption-image relevance matrix RVLR's NDCG uses.

Definitions (coco-caption's ``Rouge`` scorer; RVLR's ``{dataset}-rougeL.npy`` files are of TERN's shape and
convention, see the spec):

* Tokens (``tokenizer="ptb"``, the default): coco-caption's pipeline, i.e. Stanford's PTBTokenizer 3.4.1
  (``-lowerCase``) followed by the removal of the tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``.
  Reproduced here in pure Python for what captions contain, checked against the Java tokenizer: hyphenated,
  slash- and dot-joined words stay one token (``t-shirt``, ``m/s``, ``3.5``, ``1,000``, ``10:30``); clitics split
  off (``does n't``, ``dog 's``, ``ca n't``; ``cannot`` -> ``can not``); acronyms and common abbreviations keep
  their period (``u.s.``, ``mr.``); quotes, periods, dashes, ``, ; : ! ?`` go; runs such as ``!!`` or ``?!`` stay
  tokens, as do other symbols (``$ % & # * + =``). Quirk kept: ``-lowerCase`` applies after the bracket escapes,
  so ``(`` becomes ``-lrb-``, which the (upper-case) removal list misses: brackets stay as ``-lrb-``/``-rrb-``/
  ``-lsb-``/``-rsb-``/``-lcb-``/``-rcb-``. Not reproduced (rare in captions): the lexer's full abbreviation list
  and its rules for initials (``a.``) and ``no.1``, ``@home``, ``c++``, SGML tags, URLs and e-mail addresses with
  unusual characters, clitics inside compounds (``man's-best-friend``), ``y'all`` and ``rock'n'roll``, time-unit
  splits (``12:30pm``); a caption of punctuation only has no tokens (ROUGE-L 0) where coco-caption would score one
  empty token.
* ``tokenizer="whitespace"``: TERN's ``evaluate_utils/compute_relevance.py`` (the probable origin of RVLR's files)
  calls the ``Rouge`` scorer on raw captions, which only lower-cases and splits on single spaces: punctuation stays
  attached (``table.`` differs from ``table``) and repeated spaces give empty tokens.
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
TOKENIZERS = ("ptb", "whitespace")
# Caption pairs per vectorised block (rows x columns); bounds the [rows, cols, words] int16 buffers.
_BLOCK = 384

#: coco-caption's ``PUNCTUATIONS``: PTB tokens dropped after tokenisation (compared with the lower-cased tokens).
PTB_REMOVED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                         "...", ";"])  # fmt: skip
_A = r"[^\W_]"  # a letter or digit (any script)
# Alternatives of the PTB scanner; at each position the longest match wins (the first on ties), as in a lexer.
_PTB_RULES = [
    re.compile(r"(?:https?|ftp)://[^\s\"'<>()\[\]{}]*[^\s\"'<>()\[\]{}.,;:!?]"),  # URL
    re.compile(rf"{_A}[\w.+-]*@{_A}+(?:[.-]{_A}+)*"),  # e-mail address
    re.compile(rf"(?:{_A}\.){{2,}}"),  # acronym: u.s., e.g., o.k.
    re.compile(r"(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|co|ltd|ave|mt|prof)\.(?![^\W_])"),  # abbreviation
    re.compile(rf"{_A}+(?:(?:[-/_.'’]|(?<=\d)[,:](?=\d)){_A}+)*"),  # word: t-shirt, m/s, 3.5, 1,000, 10:30
    re.compile(r"'\d\ds"),  # '90s
    re.compile(r"\.+|-+|[!?]+|``|''"),  # runs of periods, dashes, ! and ?; LaTeX-style quotes
    re.compile(r"\S"),  # any other character is a token of its own
]
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = frozenset("\"“”„‟`‘’'")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")
_ASSIMILATIONS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                  "wanna": ["wan", "na"], "lemme": ["lem", "me"], "gimme": ["gim", "me"]}  # fmt: skip


def _ptb_tokens(text: str) -> list[str]:
    """PTBTokenizer-style tokens of lower-cased ``text`` (before coco-caption's removal list)."""
    out: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos].isspace():
            pos += 1
            continue
        token = max((m.group() for rule in _PTB_RULES if (m := rule.match(text, pos))), key=len)
        pos += len(token)
        if token in _BRACKETS:
            out.append(_BRACKETS[token])
        elif token[0] in ".-" and token.strip(token[0]) == "":
            out.append(token[0])  # a run of periods or dashes: ".", ". .", "...", "-", "--": all removed
        elif token in _QUOTES:
            out.append("'")  # a lone quote: `` / '' / ` / ' in PTB, all on the removal list
        elif token[0].isalnum() and "@" not in token and "://" not in token:
            word = token.replace("’", "'")
            if word in _ASSIMILATIONS:
                out.extend(_ASSIMILATIONS[word])
            elif clitic := _CLITIC.fullmatch(word):
                out.extend(clitic.groups())
            else:
                out.append(word)
        else:
            out.append(token)
    return out


def tokenize(caption: str, tokenizer: str = "ptb") -> list[str]:
    """The tokens ROUGE-L compares: coco-caption's PTB tokens without its punctuation list (``ptb``), or the
    lower-cased caption split on single spaces (``whitespace``, TERN's relevance script); see the module docstring."""
    if tokenizer == "whitespace":
        return caption.lower().split(" ")
    if tokenizer != "ptb":
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    return [t for t in _ptb_tokens(caption.lower()) if t not in PTB_REMOVED]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (the plain dynamic programme)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, references: Sequence[str], beta: float = BETA, tokenizer: str = "ptb") -> float:
    """Multi-reference ROUGE-L F-measure of ``candidate`` (coco-caption's definition, see the module docstring)."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    cand = tokenize(candidate, tokenizer)
    if not cand:
        return 0.0
    precision = recall = 0.0
    for ref in references:
        toks = tokenize(ref, tokenizer)
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
    captions_a: Sequence[str],
    captions_b: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    tokenizer: str = "ptb",
) -> np.ndarray:
    """``[len(a), len(b)]`` token-level LCS lengths (int32), computed in length-sorted blocks."""
    tokens_b = [tokenize(c, tokenizer) for c in captions_b]
    return _token_lcs_matrix([tokenize(c, tokenizer) for c in captions_a], tokens_b, progress)


def _token_lcs_matrix(
    tok_a: list[list[str]], tok_b: list[list[str]], progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """:func:`lcs_matrix` of already tokenized captions."""
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
    tokenizer: str = "ptb",
) -> np.ndarray:
    """``Rel[c, j]`` = ROUGE-L of caption ``c`` against all captions of image ``j``; float32 ``[C, N]``.

    ``img2txt[j]`` lists the caption indices of image ``j`` (the gallery's ground truth); ``tokenizer`` as in
    :func:`tokenize`.
    """
    if not img2txt or any(len(refs) == 0 for refs in img2txt):
        raise ValueError("every image needs at least one caption to serve as its references")
    tokens = [tokenize(c, tokenizer) for c in captions]  # once: every row chunk reads all of them
    lengths = np.array([len(t) for t in tokens], dtype=np.float64)
    rel = np.zeros((len(captions), len(img2txt)), dtype=np.float32)
    # columns grouped by image, so one reduceat takes each image's maximum over its references
    columns = np.concatenate([np.asarray(refs, dtype=np.int64) for refs in img2txt])
    group_starts = np.cumsum([0] + [len(refs) for refs in img2txt[:-1]])
    # Rows in chunks so COCO-5K holds one [chunk, 25k] LCS slab at a time, not the 25k x 25k table.
    chunk = 4 * _BLOCK
    starts = range(0, len(captions), chunk)
    for done, start in enumerate(starts):
        lcs = _token_lcs_matrix(tokens[start : start + chunk], tokens).astype(np.float64)
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
