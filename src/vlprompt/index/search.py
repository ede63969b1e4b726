"""Query an index folder (see :mod:`vlprompt.index.build`): a text, an image or video file, or one of its items.

The query goes through the same encoder that built the index (rebuilt from the manifest's model spec), then
FAISS returns the top k rows by inner product of L2-normalised embeddings (cosine similarity). Equal scores among
the returned rows are ordered by row (which of several equal-scoring items, e.g. duplicate captions, fill the last
places is FAISS's deterministic choice). For ``ivfpq`` indexes, ``rerank`` x k
candidates are re-scored exactly from the feature cache, so every score shown is an exact cosine similarity.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from vlprompt.errors import ConfigError, DataError
from vlprompt.eval.scores import order_by_score, similarity_np, top_k
from vlprompt.index.build import FORMAT, MANIFEST, VERSION, import_faiss, open_caches
from vlprompt.methods import Method

# Candidates asked of FAISS beyond k: items that tie with the k-th best under exact scoring are then among the
# candidates whichever of them FAISS's float32 kernel happened to rank higher.
_TIE_MARGIN = 8


@dataclass
class Hit:
    """One result: its rank (1 = best), index row, cosine similarity and item record."""

    rank: int
    row: int
    score: float
    item: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        public = {k: v for k, v in self.item.items() if k not in ("part", "cache_row")}
        return {"rank": self.rank, "row": self.row, "score": self.score, **public}


def _inside(real: str, root: str) -> bool:
    """Whether the real path ``real`` is ``root`` or lies under it (both symlink-free)."""
    return os.path.commonpath([real, root]) == root


#: What every manifest that :func:`~vlprompt.index.build.build_from_parts` writes holds (read without .get()).
_MANIFEST_KEYS = ("model", "data", "modality", "kinds", "index", "count", "dim", "media_root", "items", "caches",
                  "skipped", "created")  # fmt: skip


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """An index folder's manifest, or a DataError saying what is wrong with the folder."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if (root / "cache").is_dir():
            raise DataError(
                f"{root} is an unfinished index (no {MANIFEST}); run the same `vlprompt index build` again"
            )
        raise DataError(f"{root} is not an index folder (no {MANIFEST}); build one with `vlprompt index build`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"unreadable index manifest {path}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    index, caches = manifest.get("index"), manifest.get("caches")
    if not missing and not (isinstance(index, dict) and {"kind", "params", "file"} <= set(index)):
        missing = ["index.kind/params/file"]
    if missing or not isinstance(caches, dict):
        raise DataError(f"{path} is damaged (missing or malformed: {', '.join(missing) or 'caches'})")
    return manifest


class SearchIndex:
    """A loaded index folder: items, FAISS index, feature caches and (unless ``encoder=False``) the query encoder.

    ``media_root`` replaces the folder the item paths are relative to (media moved since the build);
    ``ef_search`` (hnsw) and ``nprobe`` (ivfpq) override the search parameters stored in the manifest.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        device: str = "auto",
        encoder: bool | Method = True,
        media_root: str | os.PathLike | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        faiss = import_faiss()
        try:
            self.items: list[dict[str, Any]] = [
                json.loads(line) for line in (self.root / self.manifest["items"]).read_text().splitlines() if line
            ]
            self.index = faiss.read_index(str(self.root / self.manifest["index"]["file"]))
        except (OSError, ValueError, RuntimeError) as err:
            raise DataError(f"index folder {self.root} is damaged: {err}") from err
        if len(self.items) != self.index.ntotal or self.index.ntotal != self.manifest["count"]:
            raise DataError(f"index folder {self.root} is inconsistent: items, index and manifest counts differ")
        self.caches = open_caches(self.root, self.manifest)
        self._check_items()
        root_dir = media_root if media_root is not None else self.manifest.get("media_root")
        # the real path (symlinks resolved): media_path compares real paths on both sides
        self.media_root = os.path.realpath(root_dir) if root_dir else None
        params = self.manifest["index"]["params"]
        for name, value, kind in (("ef_search", ef_search, "hnsw"), ("nprobe", nprobe, "ivfpq")):
            if value is not None and self.kind != kind:
                raise ConfigError(f"{name} is a search parameter of {kind} indexes; this index is {self.kind}")
            if value is not None and int(value) < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        self.ef_search = int(ef_search or params.get("ef_search") or 0)
        self.nprobe = int(nprobe or params.get("nprobe") or 0)
        if self.nprobe:
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        self.method: Method | None = None
        if isinstance(encoder, Method):
            self.method = encoder.eval()
        elif encoder:
            from vlprompt.index.sources import load_model

            self.method = load_model(self.manifest["model"], device)
        self._plans = self.method.plans() if self.method is not None else None

    def _check_items(self) -> None:
        """Every item's embedding must be in a cache (else :meth:`vectors` would return garbage for it)."""
        for row, item in enumerate(self.items):
            if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("id", "kind")):
                raise DataError(
                    f"index folder {self.root} is damaged: record {row} of {self.manifest['items']} is not an item"
                )
            cache = self.caches.get(item.get("part"))
            r = item.get("cache_row")
            if cache is None or type(r) is not int or not 0 <= r < len(cache):
                raise DataError(
                    f"index folder {self.root} is inconsistent: item {row} names no row of its feature caches "
                    f"(part {item.get('part')!r}, cache_row {r!r}); build the index again"
                )

    # ---- facts -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> str:
        """The FAISS index kind: flat, hnsw or ivfpq."""
        return str(self.manifest["index"]["kind"])

    @property
    def max_query_tokens(self) -> int:
        """How many tokens of a text query the encoder reads (start and end of text included)."""
        return int(self.manifest.get("max_words") or self.manifest.get("context_length") or 77)

    def query_tokens(self, text: str) -> int | None:
        """Tokens ``text`` takes (start and end of text included), when the tokenizer can say."""
        if self.method is None:
            return None
        encode = getattr(self.method.backbone.tokenizer, "encode", None)
        if encode is None:
            return None
        return len(encode(text + self.method.caption_suffix)) + 2 + self.method.n_placeholders

    def media_path(self, row: int) -> Path | None:
        """The media file of item ``row`` (for text items: the image or video they describe), only if it lies
        inside the media root: absolute paths and ``..`` in an items file are refused, and so is a symlink (the
        file itself, a folder on its way, or a frame inside a video's frame folder) that leads out of the root.

        The path returned is the real one (symlinks resolved), so what is opened is what was checked.
        """
        if not 0 <= row < len(self.items) or self.media_root is None:
            return None
        rel = self.items[row].get("path")
        if not isinstance(rel, str) or not rel:
            return None
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or "\\" in rel or "\x00" in rel:
            return None
        root = self.media_root
        full = os.path.realpath(os.path.join(root, *pure.parts))
        if not _inside(full, root):
            return None
        if os.path.isdir(full):  # a video stored as a folder of frames: each frame must stay inside too
            try:
                names = os.listdir(full)
            except OSError:
                return None
            if not all(_inside(os.path.realpath(os.path.join(full, n)), root) for n in names):
                return None
        return Path(full)

    # ---- vectors ---------------------------------------------------------------------------------
    def vectors(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Exact embeddings of index rows (all rows by default) as float32 ``[n, dim]``, from the caches."""
        rows = np.arange(len(self.items)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.size, int(self.manifest["dim"])), dtype=np.float32)
        parts = np.array([self.items[r]["part"] for r in rows.tolist()], dtype=object)
        for part, cache in self.caches.items():
            sel = parts == part
            if sel.any():
                out[sel] = cache.take([self.items[r]["cache_row"] for r in rows[sel].tolist()])
        return out

    def _encoder(self) -> Method:
        if self.method is None:
            raise DataError("this SearchIndex was opened without its encoder (encoder=False)")
        return self.method

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Query embeddings ``[n, dim]`` of texts."""
        return self.encode_texts(texts)[0]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Query embeddings ``[n, dim]`` of texts and, per text, whether the encoder read only its start (the
        tokens past :attr:`max_query_tokens` cut off).

        One tokenization tells both, which matters: the tokenizer costs a good share of a small model's pass. A
        cut text ends with end-of-text in the last place (the tokenizer writes it over the last token kept), so
        only the texts that end there, cut or fitting exactly, are counted again (:meth:`query_tokens`).
        """
        method = self._encoder()
        tokens = method.tokenize(list(texts))
        vectors = method.encode_text(tokens, self._plans).float().cpu().numpy()
        tower = method.backbone.text
        if getattr(tower, "pool_type", None) in ("argmax", "eos"):  # the tower finds end-of-text: so can we
            ends_last = (tower.pool_positions(tokens) == tokens.shape[1] - 1).tolist()
        else:
            ends_last = [True] * len(texts)
        cut = [bool(last) and (self.query_tokens(t) or 0) > self.max_query_tokens for t, last in zip(texts, ends_last)]
        return vectors, cut

    @torch.no_grad()
    def encode_media(self, path: str | os.PathLike) -> np.ndarray:
        """Query embedding ``[1, dim]`` of an image or video file."""
        from vlprompt.data.media import load_image
        from vlprompt.data.video import VideoTransform, is_video_file, read_frames

        method = self._encoder()
        b, device = method.backbone, method.backbone.device
        if is_video_file(str(path)) or Path(path).is_dir():
            frames, mask = read_frames(path, int(self.manifest.get("num_frames") or 12))
            clip = VideoTransform(b.image_size, b.image_mean, b.image_std)(frames)[None].to(device)
            out = method.encode_video(clip, mask[None].to(device), self._plans)
        else:
            image = b.preprocess_val(load_image(path))[None].to(device)
            out = method.encode_image(image, self._plans)
        return out.float().cpu().numpy()

    # ---- search ----------------------------------------------------------------------------------
    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores, rows)``, each ``[n, min(k, len)]``, best first, ties by row.

        FAISS proposes candidates; they are re-scored exactly (:mod:`vlprompt.eval.scores`) and ordered by the one tie
        rule, so the answer does not depend on how FAISS's float32 kernel rounded equal scores.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), len(self.items)))
        want = k
        if self.kind == "ivfpq":
            want = k * int(self.manifest["index"]["params"].get("rerank") or 1)
        want = min(len(self.items), want + _TIE_MARGIN)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, want)
        _, rows = self.index.search(queries, want)
        scores = np.where(rows >= 0, self._exact_scores(queries, rows), -np.inf)  # faiss pads with -1
        order = order_by_score(scores, rows)[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def _exact_scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        vecs = self.vectors(np.where(rows >= 0, rows, 0).reshape(-1)).reshape(*rows.shape, -1)
        return np.stack([similarity_np(q, v)[0] for q, v in zip(queries, vecs)])

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """Hits of one query's ``(scores, rows)``."""
        return [
            Hit(rank, int(r), float(s), self.items[int(r)])
            for rank, (s, r) in enumerate(zip(scores, rows), start=1)
            if r >= 0
        ]

    def search(self, text: str, k: int = 10) -> list[Hit]:
        """The top-k items for a text query."""
        return self.search_many([text], k)[0]

    def search_many(self, queries: Sequence[str | int], k: int | Sequence[int] = 10) -> list[list[Hit]]:
        """The top-k items of each query, a text or the row of an item (as :meth:`search_like`), at once.

        The texts share one encoder pass, items' embeddings come from the caches, and the queries that ask for the
        same k are searched together (one FAISS call each, as k decides how many candidates are re-scored). So each
        query gets the hits it gets alone; only the encoder's float rounding may differ between a batch and a
        single text (a matrix product's summation order depends on its shape), which moves scores by about 1e-7.
        ``k`` is one number for all queries or one per query.
        """
        return self.search_batch(queries, k)[0]

    def search_batch(
        self, queries: Sequence[str | int], k: int | Sequence[int] = 10
    ) -> tuple[list[list[Hit]], list[bool]]:
        """:meth:`search_many`'s hits and, per query, whether the encoder read only the start of it (a text longer
        than :attr:`max_query_tokens`; never an item), from the same encoder pass (:meth:`encode_texts`)."""
        ks = [int(k)] * len(queries) if isinstance(k, int) else [int(n) for n in k]
        if len(ks) != len(queries):
            raise ValueError(f"search_many got {len(queries)} queries but {len(ks)} values of k")
        texts = [i for i, q in enumerate(queries) if isinstance(q, str)]
        items = [i for i, q in enumerate(queries) if not isinstance(q, str)]
        for i in items:
            if not 0 <= int(queries[i]) < len(self.items):
                raise DataError(f"no item {queries[i]} in this index (0..{len(self.items) - 1})")
        vectors = np.empty((len(queries), int(self.manifest["dim"])), dtype=np.float32)
        cut = [False] * len(queries)
        if texts:
            vectors[texts], text_cut = self.encode_texts([str(queries[i]) for i in texts])
            for i, c in zip(texts, text_cut):
                cut[i] = c
        if items:
            vectors[items] = self.vectors([int(queries[i]) for i in items])
        out: list[list[Hit]] = [[] for _ in queries]
        for n in sorted(set(ks)):
            same = [i for i, m in enumerate(ks) if m == n]
            scores, rows = self.search_vectors(vectors[same], n)
            for j, i in enumerate(same):
                out[i] = self.hits(scores[j], rows[j])
        return out, cut

    def search_media(self, path: str | os.PathLike, k: int = 10) -> list[Hit]:
        """The top-k items for an image or video file."""
        scores, rows = self.search_vectors(self.encode_media(path), k)
        return self.hits(scores[0], rows[0])

    def search_like(self, row: int, k: int = 10) -> list[Hit]:
        """The top-k items most similar to item ``row`` (itself first)."""
        return self.search_many([row], k)[0]


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k rows ``[n, k]`` by inner product (ties by row): the reference for approximate search."""
    return top_k(queries, vectors, k)


def recall_with_ties(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per query, the fraction of returned ``rows`` ``[n, k]`` that belong in the exact top k.

    A row belongs when its exact score reaches the k-th best exact score, so that which of several equal-scoring
    items fills the last places (duplicate captions) does not count as a miss.
    """
    sims = similarity_np(queries, vectors)
    k = rows.shape[1]
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    got = np.take_along_axis(sims, np.where(rows >= 0, rows, 0), axis=1)
    return ((got >= kth[:, None]) & (rows >= 0)).mean(axis=1)


def index_queries(index: SearchIndex, limit: int = 1000) -> list[str]:
    """Texts to query an index with: its items' captions (visual index) or texts (text index), in item order."""
    texts: list[str] = []
    for item in index.items:
        texts += [item["text"]] if item.get("text") else list(item.get("captions") or [])[:1]
        if len(texts) >= limit:
            break
    return texts[:limit]


def benchmark(index: SearchIndex, queries: Sequence[str], k: int = 10, repeats: int = 1) -> dict[str, Any]:
    """Latency of single text queries (encode + search) and recall@k agreement with exact brute force.

    ``agreement@k`` is the mean fraction of the exact top-k that the index returns (:func:`recall_with_ties`;
    1.0 for ``flat``).
    """
    if not queries:
        raise DataError("no queries to benchmark with (the index items have no captions)")
    t = time.perf_counter()
    encoded = index.encode_text(queries)
    encode_s = time.perf_counter() - t
    latencies = []
    for _ in range(repeats):
        for q in queries:
            t = time.perf_counter()
            index.search_vectors(index.encode_text([q]), k)
            latencies.append(1000 * (time.perf_counter() - t))
    search_only = []
    for row in range(len(queries)):
        t = time.perf_counter()
        index.search_vectors(encoded[row : row + 1], k)
        search_only.append(1000 * (time.perf_counter() - t))
    _, rows = index.search_vectors(encoded, k)
    agreement = float(np.mean(recall_with_ties(index.vectors(), encoded, rows)))
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "index": index.kind,
        "items": len(index),
        "queries": len(queries),
        "k": k,
        "query_ms/p50": statistics.median(latencies),
        "query_ms/p95": quantiles[18],
        "search_only_ms/p50": statistics.median(search_only),
        "batch_encode_ms/query": 1000 * encode_s / len(queries),
        f"agreement@{k}": agreement,
    }
