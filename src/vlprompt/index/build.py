"""Build a search index: embed a dataset's items with a model (resumable cache), then a FAISS index over them.

Layout of an index folder::

    manifest.json   what the index is: model spec, data, modality, FAISS kind and parameters, counts, timings
    items.jsonl     one JSON record per index row: id, kind, path relative to ``media_root``, captions (or the
                    caption itself for a text index), and where its embedding is (``part``, ``cache_row``)
    index.faiss     the FAISS index (inner product on L2-normalised embeddings = cosine similarity)
    cache/<kind>/   the embeddings, a :class:`~vlprompt.data.features.FeatureCache` per kind of input

Extraction goes through :func:`~vlprompt.data.features.extract_features`, so a crash loses at most the shard in
progress: building again with the same arguments resumes, and building with another ``kind`` of FAISS index
reuses the cache without encoding anything. ``manifest.json`` is written last; an index folder without it is
unfinished. Items whose media fail to decode are left out of the index (listed in ``manifest["skipped"]``).

Index kinds: ``flat`` (exact, the default), ``hnsw`` (graph search, full vectors, fast for large galleries) and
``ivfpq`` (inverted lists + product quantisation: compact; its top candidates are re-scored exactly from the
cache at search time).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlprompt.data.features import FeatureCache, extract_features
from vlprompt.errors import ConfigError, DataError
from vlprompt.index.sources import Part, collect_parts, resolve_data, resolve_model
from vlprompt.methods import Method

FORMAT = "vlprompt-index"
VERSION = 1
MANIFEST, ITEMS, INDEX_FILE = "manifest.json", "items.jsonl", "index.faiss"
INDEX_KINDS = ("flat", "hnsw", "ivfpq")
#: Defaults of each kind's parameters (``None`` = chosen from the gallery size and dimension).
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": None, "rerank": 4},
}


def import_faiss() -> Any:
    """Import faiss, or say which extra installs it."""
    try:
        import faiss
    except ImportError as err:
        raise ConfigError(
            "search indexes need faiss: pip install 'vlprompt[index]' (or pip install faiss-cpu)"
        ) from err
    return faiss


# ---- FAISS --------------------------------------------------------------------------------------------
def index_params(kind: str, params: dict[str, Any] | None, n: int, dim: int) -> dict[str, Any]:
    """``kind``'s parameters: defaults, then ``params``, then sizes picked for ``n`` vectors of ``dim``."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULT_PARAMS[kind]))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for a {kind} index; valid: {sorted(DEFAULT_PARAMS[kind])}")
    p = {**DEFAULT_PARAMS[kind], **given}
    if kind == "ivfpq":
        # faiss wants about 39 training points per list; 4*sqrt(n) lists is its usual rule of thumb
        p["nlist"] = int(p["nlist"] or max(1, min(int(4 * math.sqrt(n)), n // 39)))
        p["m"] = int(p["m"] or next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0))
        p["nprobe"] = int(p["nprobe"] or min(p["nlist"], 16))
        if dim % p["m"]:
            raise ConfigError(f"ivfpq: m={p['m']} sub-quantisers must divide the embedding size {dim}")
        if n < max(p["nlist"], 2 ** p["nbits"]):
            raise ConfigError(
                f"ivfpq needs at least {max(p['nlist'], 2 ** p['nbits'])} items to train (nlist={p['nlist']}, "
                f"nbits={p['nbits']}); this gallery has {n}: use --kind flat or hnsw, or fewer nbits"
            )
    return p


def make_faiss_index(vectors: np.ndarray, kind: str, params: dict[str, Any]) -> Any:
    """A FAISS inner-product index of ``kind`` over ``vectors`` ``[n, d]`` (float32, L2-normalised)."""
    faiss = import_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(
            quantizer, d, params["nlist"], params["m"], int(params["nbits"]), faiss.METRIC_INNER_PRODUCT
        )
        # small galleries train on fewer points than faiss likes; the exact re-scoring at search time makes up
        # for coarser centroids, so its per-sub-quantiser warnings would only be noise
        index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
        index.train(vectors)
    index.add(vectors)
    return index


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


# ---- encoding -----------------------------------------------------------------------------------------
def part_encoder(method: Method, kind: str, autocast: str = "none") -> Callable[[Any], torch.Tensor]:
    """``encode(batch)`` for a part's collated batches: images, (frames, mask) pairs or caption strings."""
    from vlprompt.core.evaluate import autocast_context

    device = method.backbone.device
    plans = method.plans()  # sample-independent: computed once for the whole gallery

    def encode(batch: Any) -> torch.Tensor:
        with torch.no_grad(), autocast_context(device, autocast):
            if kind == "image":
                out = method.encode_image(batch.to(device), plans)
            elif kind == "video":
                frames, mask = batch
                out = method.encode_video(frames.to(device), mask.to(device), plans)
            else:
                out = method.encode_text(list(batch), plans)
        return out.float()

    return encode


def _relative_paths(items: list[dict[str, Any]]) -> str | None:
    """Make every item's ``path`` relative to their common folder (returned); media can then move together."""
    paths = [os.path.abspath(it["path"]) for it in items if it.get("path")]
    if not paths:
        return None
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    for it in items:
        if it.get("path"):
            it["path"] = Path(os.path.relpath(os.path.abspath(it["path"]), root)).as_posix()
    return root


# ---- the build ----------------------------------------------------------------------------------------
def build_from_parts(
    out: str | os.PathLike,
    method: Method,
    spec: dict[str, Any],
    parts: Sequence[Part],
    data: dict[str, Any] | None = None,
    modality: str = "visual",
    kind: str = "flat",
    params: dict[str, Any] | None = None,
    batch_size: int = 256,
    shard_size: int = 4096,
    dtype: str = "float32",
    autocast: str = "none",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``parts`` with ``method`` into ``out``'s cache, build the FAISS index, write items and manifest."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vectors, items, skipped, caches = [], [], [], {}
    for part in parts:
        report = (lambda done, total, k=part.kind: progress(k, done, total)) if progress else None
        cache = extract_features(
            part_encoder(method, part.kind, autocast),
            part.dataset,
            part.ids,
            root / "cache" / part.kind,
            encoder=f"{spec['kind']}:{spec['target']}@{spec['fingerprint']}/{part.kind}",
            modality=part.kind,
            batch_size=batch_size,
            shard_size=shard_size,
            num_workers=num_workers,
            dtype=dtype,
            overwrite=overwrite,
            info={"data": data or {}},
            progress=report,
        )
        caches[part.kind] = {"cache": f"cache/{part.kind}", "rows": len(cache), "dtype": cache.meta["dtype"]}
        missing = set(cache.missing)
        keep = [r for r, i in enumerate(part.ids) if i not in missing]
        skipped += [i for i in part.ids if i in missing]
        vectors.append(cache.take(keep))
        items += [{**part.items[r], "part": part.kind, "cache_row": r} for r in keep]
    t_extract = time.perf_counter() - t0
    if not items:
        raise DataError("no item could be encoded: nothing to index")
    matrix = np.concatenate(vectors)
    n, dim = matrix.shape
    p = index_params(kind, params, n, dim)
    t1 = time.perf_counter()
    index = make_faiss_index(matrix, kind, p)
    t_index = time.perf_counter() - t1
    faiss = import_faiss()
    (root / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until the new manifest is written
    _atomic(root / INDEX_FILE, lambda tmp: faiss.write_index(index, tmp))
    media_root = _relative_paths(items)
    _write_text(root / ITEMS, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": spec,
        "data": data or {},
        "modality": modality,
        "kinds": sorted({it["kind"] for it in items}),
        "index": {"kind": kind, "metric": "inner_product", "params": p, "file": INDEX_FILE},
        "count": n,
        "dim": dim,
        "max_words": int(getattr(method, "max_words", 0) or 0),
        "context_length": int(method.backbone.context_length),
        "num_frames": next((int(q.dataset.num_frames) for q in parts if q.kind == "video"), None),
        "media_root": media_root,
        "items": ITEMS,
        "caches": caches,
        "skipped": skipped,
        "timing": {"extract_s": round(t_extract, 3), "index_s": round(t_index, 3)},
        "versions": _versions(faiss),
    }
    _write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _versions(faiss: Any) -> dict[str, str]:
    from vlprompt.version import __version__

    return {"vlprompt": __version__, "torch": torch.__version__, "faiss": faiss.__version__}


def build_index(
    out: str | os.PathLike,
    model: str,
    data: str | None = None,
    *,
    pretrained: str | None = None,
    split: str = "test",
    fmt: str | None = None,
    root: str | None = None,
    modality: str = "visual",
    kind: str = "flat",
    params: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    num_frames: int | None = None,
    batch_size: int = 256,
    shard_size: int = 4096,
    dtype: str = "float32",
    autocast: str = "none",
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """``vlprompt index build``: resolve ``model`` and ``data`` (see :mod:`vlprompt.index.sources`) and build.

    Returns the manifest (also written to ``out/manifest.json``).
    """
    method, spec = resolve_model(model, pretrained, overrides, device)
    source = resolve_data(data, spec, split, fmt, root, overrides)
    parts = collect_parts(source, modality, method, num_frames)
    workers = source.data.num_workers if source.data is not None else 0
    return build_from_parts(
        out, method, spec, parts, source.described, modality, kind, params, batch_size, shard_size, dtype,
        autocast, workers, overwrite, progress,
    )  # fmt: skip


def open_caches(root: Path, manifest: dict[str, Any]) -> dict[str, FeatureCache]:
    """The feature caches of an index folder, by part kind, each checked when opened: its rows and dtype are
    those the manifest records and every shard is present with the right dtype and shape (cheap: headers only),
    so a damaged cache is reported here rather than by the first query that reads it."""
    caches = {}
    for kind, info in manifest["caches"].items():
        if not isinstance(info, dict) or not {"cache", "rows", "dtype"} <= set(info):
            raise DataError(f"index folder {root}: the manifest's record of the {kind} cache is damaged")
        cache = FeatureCache(root / info["cache"])
        if len(cache) != info["rows"] or cache.meta["dtype"] != info["dtype"]:
            raise DataError(
                f"index folder {root}: the {kind} cache holds {len(cache)} {cache.meta['dtype']} rows, the manifest "
                f"records {info['rows']} {info['dtype']} rows; build the index again"
            )
        try:
            cache.check_shards()
        except DataError as err:
            raise DataError(f"{err}: for this index, the same `vlprompt index build` again") from err
        caches[kind] = cache
    return caches
