"""Captioning metrics: CLIPScore and RefCLIPScore on features, and coco-caption's BLEU-1..4, METEOR, ROUGE-L, CIDEr and
SPICE through ``pycocoevalcap`` (``pip install 'vlprompt[caption]'``).

CLIPScore (Hessel et al., EMNLP 2021; official code ``jmhessel/clipscore``, also used by RLCF's ``clipscore/``):

* ``CLIP-S(c, v) = w * max(cos(c, v), 0)`` with ``w = 2.5``, ``c`` the caption's and ``v`` the image's embedding by
  the evaluation CLIP; the corpus score is the mean over images. Range ``[0, 2.5]``.
* ``RefCLIP-S(c, R, v) = H(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0))``, the *per-image* harmonic mean
  ``H(a, b) = 2ab / (a + b)`` (0 when ``a + b = 0``), then the mean over images. The reference term carries **no**
  ``w`` (paper and code alike), so it lies in ``[0, 1]`` while CLIP-S lies in ``[0, 2.5]``. The official code does not
  clamp the reference term at 0 (the paper does); the two differ only when every reference has a negative cosine
  with the candidate, which CLIP text pairs practically never do, and there the code's value is not a score.
* Features are L2-normalised here; cosines are float64 sums of elementwise products (no matrix product), so the
  scores do not depend on the BLAS kernel. What to pass: ``image_feats = clip.encode_image(preprocess(image))`` and
  ``caption_feats = clip.encode_text(tokenize(CLIPSCORE_PREFIX + caption))``, references encoded the same way with
  the same prefix. Hessel et al. and RLCF's Table 3 evaluate with OpenAI's ViT-B/32 and the prefix
  ``"A photo depicts "`` (RLCF's test-time *reward* uses the raw caption and no prefix). Papers print both ×100.

coco-caption metrics (:func:`caption_metrics`), computed as ``pycocoevalcap.eval.COCOEvalCap`` does: candidates and
references are PTB-tokenized (Stanford PTBTokenizer 3.4.1 with ``-lowerCase``, then its punctuation list removed),
then scored by pycocoevalcap's ``Bleu(4)`` (corpus BLEU, "closest" reference length), ``Meteor`` (METEOR 1.5),
``Rouge`` (ROUGE-L, beta 1.2), ``Cider`` (CIDEr-D: sigma 6, clipped counts, ×10; document frequencies from the
references of the evaluated set, so a score depends on the whole set) and SPICE 1.0, on coco-caption's scale
(fractions; CIDEr up to 10; papers print ×100). Differences from calling pycocoevalcap's classes:

* Java: the PTB tokenizer, METEOR and SPICE run Java. Without a working ``java`` METEOR and SPICE are *unavailable*
  (``None`` with the reason, never 0) and tokenization falls back to :func:`vlprompt.eval.rouge.tokenize`, a
  pure-Python reproduction of the same pipeline that matches the Java tokenizer on COCO-style captions (its
  docstring lists what it does not reproduce); the result's ``tokenizer`` says which one ran.
* The tokenizer and SPICE jars (those pycocoevalcap ships) are run here with their input in a temporary directory
  (pycocoevalcap writes its temporary files into its own package directory) and with a time limit.
* SPICE needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's ``spice/lib``; pycocoevalcap downloads them
  (several hundred MB) when its ``Spice`` class is built. Here nothing is downloaded: without them SPICE is unavailable
  at once with the command that fetches them. SPICE runs without its ``-cache`` (the LMDB cache of parsed captions
  fails to start on Java 16 or newer), so it re-parses the references on every call. A candidate without any
  scene-graph tuple scores NaN and makes the corpus mean NaN, as in pycocoevalcap.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlprompt.errors import DataError
from vlprompt.eval.rouge import PTB_REMOVED
from vlprompt.eval.rouge import tokenize as python_ptb_tokenize

CLIPSCORE_WEIGHT = 2.5
#: Prepended to candidate and reference captions before the evaluation CLIP encodes them (Hessel et al.'s code).
CLIPSCORE_PREFIX = "A photo depicts "

BLEU = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
COCO_METRICS = (*BLEU, "METEOR", "ROUGE-L", "CIDEr", "SPICE")
TOKENIZER_JAVA = "ptb-java"
TOKENIZER_PYTHON = "ptb-python"

_PTB_JAR = "tokenizer/stanford-corenlp-3.4.1.jar"
_SPICE_JAR = "spice/spice-1.0.jar"
# What spice-1.0.jar's manifest class path expects next to it (pycocoevalcap's get_stanford_models fetches them).
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_FETCH = "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'"
_INSTALL_JAVA = "Debian/Ubuntu: apt-get install default-jre-headless"


# ---------------------------------------------------------------------------------------------------- CLIPScore


def _as_float64(x: Any) -> torch.Tensor:
    return (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).to(torch.float64)


def _unit_rows(x: Any, what: str) -> torch.Tensor:
    """``x`` as float64 ``[N, D]`` rows of unit length; a zero row is an error (its cosine is undefined)."""
    t = _as_float64(x)
    if t.ndim != 2:
        raise ValueError(f"{what} must be a [N, D] matrix of features, got shape {tuple(t.shape)}")
    norms = t.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{what} has an all-zero row ({int((norms == 0).sum())} of {t.shape[0]}): no cosine")
    return t / norms


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosines of two aligned unit matrices (elementwise float64: no BLAS-dependent rounding)."""
    return (a * b.to(a.device)).sum(dim=1)


def clip_scores(image_feats: Any, caption_feats: Any, w: float = CLIPSCORE_WEIGHT) -> torch.Tensor:
    """Per-image CLIP-S ``w * max(cos(caption_i, image_i), 0)``, float64 ``[N]`` (see the module docstring)."""
    img = _unit_rows(image_feats, "image_feats")
    cap = _unit_rows(caption_feats, "caption_feats")
    if img.shape != cap.shape:
        raise ValueError(f"image_feats {tuple(img.shape)} and caption_feats {tuple(cap.shape)} must have one shape")
    return w * _cosines(img, cap).clamp(min=0)


def clip_score(image_feats: Any, caption_feats: Any, w: float = CLIPSCORE_WEIGHT) -> float:
    """CLIPScore of a set: the mean of :func:`clip_scores` (Hessel et al., 2021)."""
    return float(clip_scores(image_feats, caption_feats, w).mean())


def ref_clip_scores(
    image_feats: Any,
    caption_feats: Any,
    reference_feats_per_image: Sequence[Any] | torch.Tensor,
    w: float = CLIPSCORE_WEIGHT,
) -> torch.Tensor:
    """Per-image RefCLIP-S, float64 ``[N]``: the harmonic mean of CLIP-S and ``max(max_r cos(caption, r), 0)``.

    ``reference_feats_per_image[i]`` holds image ``i``'s reference embeddings ``[R_i, D]`` (``R_i >= 1``, numbers may
    differ), or the whole is one ``[N, R, D]`` tensor.
    """
    image_text = clip_scores(image_feats, caption_feats, w)
    cap = _unit_rows(caption_feats, "caption_feats")
    refs = list(reference_feats_per_image)
    if len(refs) != cap.shape[0]:
        raise ValueError(f"{len(refs)} reference sets for {cap.shape[0]} captions: one set per image is needed")
    refs = [_as_float64(r) for r in refs]
    if bad := [i for i, r in enumerate(refs) if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] != cap.shape[1]]:
        raise ValueError(
            f"reference_feats_per_image[{bad[0]}] has shape {tuple(refs[bad[0]].shape)}: every image needs "
            f"[R >= 1, {cap.shape[1]}] reference embeddings"
        )
    flat = _unit_rows(torch.cat(refs), "reference_feats_per_image")
    owner = torch.repeat_interleave(torch.arange(len(refs)), torch.tensor([len(r) for r in refs])).to(cap.device)
    sims = _cosines(cap[owner], flat)
    best = torch.full((len(refs),), -math.inf, dtype=torch.float64, device=cap.device)
    text_text = best.scatter_reduce(0, owner, sims, reduce="amax").clamp(min=0)
    total = image_text + text_text
    return torch.where(total > 0, 2 * image_text * text_text / total.clamp(min=1e-300), torch.zeros_like(total))


def ref_clip_score(
    image_feats: Any,
    caption_feats: Any,
    reference_feats_per_image: Sequence[Any] | torch.Tensor,
    w: float = CLIPSCORE_WEIGHT,
) -> float:
    """RefCLIPScore of a set: the mean of the per-image :func:`ref_clip_scores` (Hessel et al., 2021)."""
    return float(ref_clip_scores(image_feats, caption_feats, reference_feats_per_image, w).mean())


# -------------------------------------------------------------------------------------------- coco-caption metrics


@dataclass(frozen=True)
class CaptionMetrics:
    """coco-caption scores of a set of candidates: every requested metric, ``None`` where it could not run."""

    scores: dict[str, float | None]
    #: metric -> why it is ``None`` (no Java, no SPICE models, a Java process that failed)
    unavailable: dict[str, str]
    #: ``ptb-java`` (Stanford's PTBTokenizer) or ``ptb-python`` (:func:`vlprompt.eval.rouge.tokenize`) plus why
    tokenizer: str
    num_images: int

    def __getitem__(self, metric: str) -> float | None:
        return self.scores[metric]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the scores, then ``unavailable``, ``tokenizer`` and ``num_images``."""
        return {**self.scores, "unavailable": dict(self.unavailable), "tokenizer": self.tokenizer,
                "num_images": self.num_images}  # fmt: skip


class _Unavailable(Exception):
    """A metric cannot run here; the message says why."""


@functools.lru_cache(maxsize=1)
def java_problem() -> str | None:
    """``None`` when a working ``java`` is on the PATH, else why not (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return f"needs Java: no `java` on the PATH ({_INSTALL_JAVA})"
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"needs a working Java: `{java} -version` failed ({err})"
    return None


def pycocoevalcap_dir() -> Path | None:
    """The installed ``pycocoevalcap`` package directory, or ``None`` when it is not installed."""
    try:
        import pycocoevalcap
    except ImportError:
        return None
    return Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __file__


def _run_java(args: list[str], cwd: Path, timeout_s: float, stdin: bytes | None = None) -> bytes:
    """stdout of ``java ARGS``; a failure or time-out raises :class:`_Unavailable` with the end of stderr."""
    try:
        proc = subprocess.run(["java", *args], cwd=cwd, input=stdin, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise _Unavailable(f"Java did not finish within {timeout_s:g} s") from err
    except OSError as err:
        raise _Unavailable(f"Java could not start ({err})") from err
    if proc.returncode != 0:
        # The messages, not the stack frames ("at ...", "... 3 more") of a Java exception.
        lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines()]
        tail = " | ".join([ln for ln in lines if ln and not ln.startswith(("at ", "..."))][-3:])
        raise _Unavailable(f"Java exited with status {proc.returncode}: {tail}")
    return proc.stdout


def _java_ptb_tokenize(captions: list[str], root: Path, timeout_s: float) -> list[str]:
    """coco-caption's tokenization by Stanford's PTBTokenizer: one line in, one line of kept tokens out."""
    # Line breaks inside a caption would split it across output lines.
    text = "\n".join(" ".join(c.splitlines()) for c in captions)
    out = _run_java(["-cp", str(root / _PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                     "-lowerCase"], root, timeout_s, text.encode("utf-8")).decode("utf-8")  # fmt: skip
    lines = out.split("\n")  # the tokenizer keeps empty lines and adds no final newline
    if len(lines) != len(captions):
        raise _Unavailable(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(t for t in line.rstrip().split(" ") if t not in PTB_REMOVED) for line in lines]


def _tokenize(captions: list[str], root: Path, java: str | None, timeout_s: float) -> tuple[list[str], str]:
    """The captions' tokens joined by spaces, and the tokenizer that made them."""
    why = java
    if why is None:
        try:
            return _java_ptb_tokenize(captions, root, timeout_s), TOKENIZER_JAVA
        except _Unavailable as err:
            why = f"the Java PTBTokenizer failed: {err}"
    tokens = [" ".join(python_ptb_tokenize(c)) for c in captions]
    return tokens, f"{TOKENIZER_PYTHON} (vlprompt.eval.rouge's PTB tokenizer; {why})"


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()  # starts `java -jar meteor-1.5.jar` (~8 s: it loads the paraphrase table)
    except OSError as err:
        raise _Unavailable(f"METEOR's Java process could not start ({err})") from err
    try:
        return float(scorer.compute_score(gts, res)[0])
    except (ValueError, OSError) as err:  # the process died: its output is no number
        raise _Unavailable(f"METEOR's Java process failed ({err})") from err
    finally:
        del scorer  # its __del__ ends the Java process


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]], root: Path, timeout_s: float) -> float:
    spice_dir = root / "spice"
    missing = [spice_dir / "lib" / name for name in SPICE_CORENLP_JARS if not (spice_dir / "lib" / name).is_file()]
    if missing:
        raise _Unavailable(
            f"needs the Stanford CoreNLP 3.6.0 models at {missing[0]}: download them once (the CoreNLP 2015-12-09 "
            f"release from nlp.stanford.edu, several hundred MB) with {_SPICE_FETCH}"
        )
    with tempfile.TemporaryDirectory(prefix="vlprompt-spice-") as tmp:
        src, dst = Path(tmp) / "input.json", Path(tmp) / "output.json"
        src.write_text(json.dumps([{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in sorted(gts)]))
        # -Xmx8G as pycocoevalcap; no -cache (see the module docstring)
        _run_java(["-jar", "-Xmx8G", str(root / _SPICE_JAR), str(src), "-out", str(dst), "-subset", "-silent"],
                  spice_dir, timeout_s)  # fmt: skip
        results = json.loads(dst.read_text())

    def number(x: Any) -> float:
        try:
            return float(x)
        except (TypeError, ValueError):
            return math.nan

    return float(np.mean([number(item["scores"]["All"]["f"]) for item in results]))


def _check_inputs(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list[Hashable]:
    if not candidates:
        raise DataError("caption metrics need at least one candidate caption")
    if set(candidates) != set(references):
        only_c, only_r = set(candidates) - set(references), set(references) - set(candidates)
        raise DataError(
            f"candidates and references must have the same ids: {len(only_c)} only among the candidates "
            f"(e.g. {sorted(map(str, only_c))[:3]}), {len(only_r)} only among the references "
            f"(e.g. {sorted(map(str, only_r))[:3]})"
        )
    ids = list(candidates)
    for i in ids:
        refs = references[i]
        if not isinstance(candidates[i], str):
            raise DataError(f"the candidate of {i!r} must be a string, got {type(candidates[i]).__name__}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"the references of {i!r} must be a non-empty list of strings")
    return ids


def caption_metrics(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Iterable[str] | str | None = None,
    java_timeout_s: float = 3600.0,
) -> CaptionMetrics:
    """coco-caption's BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE of one candidate per image against its references.

    ``candidates[id]`` is the caption of image ``id`` and ``references[id]`` its reference captions (same ids).
    ``metrics`` picks some of :data:`COCO_METRICS` (default: all; METEOR costs ~8 s of Java start-up, SPICE parses
    every caption with CoreNLP). A requested metric that cannot run here is ``None`` with the reason in
    ``unavailable``; see the module docstring for the definitions and the fallbacks.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    wanted = list(COCO_METRICS) if metrics is None else list(dict.fromkeys(metrics))
    if unknown := [m for m in wanted if m not in COCO_METRICS]:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {list(COCO_METRICS)}")
    ids = _check_inputs(candidates, references)
    scores: dict[str, float | None] = {m: None for m in wanted}
    root = pycocoevalcap_dir()
    if root is None:
        why = "needs pycocoevalcap: pip install 'vlprompt[caption]'"
        return CaptionMetrics(scores, {m: why for m in wanted}, "none (pycocoevalcap is not installed)", len(ids))
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = java_problem()
    # Candidates and references in one tokenizer call (one Java start); images are numbered 0..N-1 inside.
    flat = [candidates[i] for i in ids] + [r for i in ids for r in references[i]]
    tokens, tokenizer = _tokenize(flat, root, java, java_timeout_s)
    res = {n: [tokens[n]] for n in range(len(ids))}
    gts, start = {}, len(ids)
    for n, i in enumerate(ids):
        gts[n] = tokens[start : start + len(references[i])]
        start += len(references[i])

    unavailable: dict[str, str] = {}
    if any(m in wanted for m in BLEU):
        bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
        scores.update({m: float(v) for m, v in zip(BLEU, bleu) if m in wanted})
    if "ROUGE-L" in wanted:
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    java_scorers = {"METEOR": lambda: _meteor(gts, res), "SPICE": lambda: _spice(gts, res, root, java_timeout_s)}
    for name in (m for m in wanted if m in java_scorers):
        if java is not None:
            unavailable[name] = java
            continue
        try:
            scores[name] = java_scorers[name]()
        except _Unavailable as err:
            unavailable[name] = str(err)
    return CaptionMetrics(scores, unavailable, tokenizer, len(ids))
