"""A reusable on-disk cache of per-sample features of a frozen encoder, looked up by sample id.

Layout of a cache folder::

    meta.json            what the features are (encoder, modality, dim, dtype), the index checksum, shard records
    ids.json             the sample ids, in row order (row r holds the features of ids[r])
    shard_00000.npy ...  [shard_size, dim] arrays (the last shard may be shorter), written atomically

* **Sample ids** are strings chosen by the caller, unique within a cache. For image-text data the helpers below
  give content-addressed ids: an image's path relative to the data root, and ``"<image id>#<sha1 of caption>"``
  for a caption, so a cache stays valid when an annotation file is reordered and fails loudly when it changes.
* **Index checksum**: the sha256 of the ordered ids. It ties the cache to the dataset index it was computed for;
  :meth:`FeatureCache.verify` and :meth:`FeatureCache.rows_of` check a dataset against it.
* **Crash safety**: features are computed in batches and stored shard by shard; each shard is written to a
  temporary file and renamed, then recorded (with its sha256) in ``meta.json``, also replaced atomically. Running
  the same extraction again after a crash keeps the recorded shards and recomputes only the rest, so a crash
  loses at most the shard in progress.
* Samples whose input fails to load (e.g. an undecodable image) get a zero row and are listed in
  ``meta["missing"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from vlprompt.data.media import BadSamples, Transform, load_or_skip
from vlprompt.errors import DataError

FORMAT = "vlprompt-features"
VERSION = 1
META, IDS = "meta.json", "ids.json"
DTYPES = ("float16", "float32")
_REDO = "run the same extraction again (it recomputes only the damaged shards)"


# ---- sample ids ---------------------------------------------------------------------------------
def index_checksum(ids: Sequence[str]) -> str:
    """sha256 of the ordered sample ids (what ties a cache to a dataset index)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def image_sample_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """An image's id: its path relative to the data root (POSIX form), or the path itself when outside it."""
    path = Path(path)
    try:
        return path.relative_to(Path(root)).as_posix()
    except ValueError:
        return path.as_posix()


def caption_sample_id(image_id: str, caption: str) -> str:
    """A caption's id: its image's id and the sha1 of its text."""
    return f"{image_id}#{hashlib.sha1(caption.encode('utf-8')).hexdigest()[:16]}"


def pair_sample_ids(pairs: Any, root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Ids of an :class:`~vlprompt.data.ImageTextPairs`: one per unique image, one per (image, caption) pair."""
    if not hasattr(pairs, "pairs") or not hasattr(pairs, "image_paths"):
        raise DataError(f"expected image-caption pairs (ImageTextPairs), got {type(pairs).__name__}")
    image_ids = [image_sample_id(p, root) for p in pairs.image_paths]
    return image_ids, [caption_sample_id(image_ids[img], cap) for img, cap in pairs.pairs]


# ---- datasets of raw inputs -------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Images by path, through ``transform``; an unreadable file gives ``None`` (counted in ``bad_samples``)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Transform | None) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.bad_samples = BadSamples()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        return load_or_skip(self.paths[i], self.transform, self.bad_samples, strict=False)


class _Rows(Dataset):
    """Rows ``start..end`` of a dataset, each item tagged with its row."""

    def __init__(self, data: Any, start: int, end: int) -> None:
        self.data, self.start, self.end = data, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.start + i, self.data[self.start + i]


def _collate(batch: list[tuple[int, Any]]) -> tuple[list[int], Any, list[int]]:
    kept = [(i, x) for i, x in batch if x is not None]
    missing = [i for i, x in batch if x is None]
    items = default_collate([x for _, x in kept]) if kept else None
    return [i for i, _ in kept], items, missing


# ---- files ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb" if binary else "w") as f:
        write(f)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; caches are meant to be shared read-only
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(data, indent=1) + "\n"), binary=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard_{k:05d}.npy"


# ---- the cache --------------------------------------------------------------------------------------
class FeatureCache:
    """A complete feature cache on disk (read-only); rows are read through memory maps."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        meta_file = self.root / META
        if not meta_file.is_file():
            raise DataError(f"no feature cache at {self.root} (missing {META}); run `vlprompt features extract`")
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text())
            self.ids: list[str] = json.loads((self.root / IDS).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"unreadable feature cache {self.root}: {err}") from err
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(f"{self.root} is not a {FORMAT} v{VERSION} cache")
        if not self.meta.get("complete"):
            raise DataError(f"feature cache {self.root} is incomplete; run the same extraction again to finish it")
        if len(self.ids) != self.meta["count"] or index_checksum(self.ids) != self.meta["index_checksum"]:
            raise DataError(f"feature cache {self.root}: {IDS} does not match the checksum in {META}")
        self._row: dict[str, int] | None = None
        self._shards: dict[int, np.ndarray] = {}

    # facts
    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def encoder(self) -> str:
        return str(self.meta["encoder"])

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", ""))

    @property
    def checksum(self) -> str:
        """The index checksum (sha256 of the ordered ids)."""
        return str(self.meta["index_checksum"])

    @property
    def missing(self) -> list[str]:
        """Ids whose input failed to load (their rows are zero)."""
        return list(self.meta.get("missing", []))

    # lookup
    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``; the identity when ``ids`` is exactly the cache's index (checked by checksum)."""
        if len(ids) == len(self) and index_checksum(ids) == self.checksum:
            return np.arange(len(self), dtype=np.int64)
        if self._row is None:
            self._row = {sid: r for r, sid in enumerate(self.ids)}
        try:
            return np.fromiter((self._row[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as err:
            raise DataError(
                f"sample {err.args[0]!r} is not in the feature cache {self.root} ({self.encoder}, {len(self)} rows); "
                "it was extracted for another dataset: extract it again for this one"
            ) from None

    @property
    def n_shards(self) -> int:
        """How many shard files the cache has."""
        return -(-len(self) // int(self.meta["shard_size"]))

    def _shard(self, k: int) -> np.ndarray:
        """Shard ``k`` memory-mapped, once its file is found to hold what ``meta.json`` records (else DataError)."""
        if k not in self._shards:
            name = shard_name(k)
            record = self.meta.get("shards", {}).get(str(k))
            if record is None:
                raise DataError(f"feature cache {self.root}: {META} records no {name}; {_REDO}")
            try:
                # a truncated file fails to map, an object array to load (no pickles are read: allow_pickle=False)
                array = np.load(self.root / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise DataError(f"feature cache {self.root}: {name} is missing or damaged ({err}); {_REDO}") from err
            expected = (int(record["rows"]), self.dim)
            if array.dtype != np.dtype(self.meta["dtype"]) or array.shape != expected:
                raise DataError(
                    f"feature cache {self.root}: {name} holds {array.dtype} {list(array.shape)}, {META} records "
                    f"{self.meta['dtype']} {list(expected)}; {_REDO}"
                )
            self._shards[k] = array
        return self._shards[k]

    def check_shards(self) -> None:
        """Raise DataError unless every shard is present with the dtype and shape ``meta.json`` records.

        Cheap at any size: only the ``.npy`` headers are read and the files mapped (a file too short for its
        header's shape cannot be mapped). :meth:`verify` with ``deep`` also compares every shard's sha256.
        """
        for k in range(self.n_shards):
            self._shard(k)

    def take(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Features of rows ``rows`` as float32 ``[len(rows), dim]``."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)}) in feature cache {self.root}")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        size = int(self.meta["shard_size"])
        shard_of = rows // size
        for k in np.unique(shard_of):
            sel = shard_of == k
            out[sel] = self._shard(int(k))[rows[sel] - k * size]
        return out

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Features of samples ``ids`` as float32 ``[len(ids), dim]``."""
        return self.take(self.rows_of(ids))

    def load_all(self) -> np.ndarray:
        """Every row, float32 ``[count, dim]`` (for small caches and index builds)."""
        return self.take(np.arange(len(self)))

    def verify(self, ids: Sequence[str] | None = None, deep: bool = False) -> None:
        """Raise DataError unless ``ids`` is the cache's index (same order), every shard is intact in dtype and
        shape (:meth:`check_shards`) and, with ``deep``, every shard's sha256 is the recorded one."""
        if ids is not None and (len(ids) != len(self) or index_checksum(ids) != self.checksum):
            raise DataError(f"feature cache {self.root} was computed for another dataset index (checksum differs)")
        self.check_shards()
        if deep:
            for k, record in sorted(self.meta["shards"].items(), key=lambda kv: int(kv[0])):
                if _sha256(self.root / shard_name(int(k))) != record["sha256"]:
                    raise DataError(f"feature cache {self.root}: {shard_name(int(k))} is corrupt (sha256 differs)")


def extract_features(
    encode: Callable[[Any], torch.Tensor],
    dataset: Any,
    ids: Sequence[str],
    out: str | os.PathLike,
    encoder: str,
    modality: str = "",
    batch_size: int = 256,
    shard_size: int = 8192,
    num_workers: int = 0,
    dtype: str = "float16",
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureCache:
    """Compute ``encode(batch)`` over ``dataset`` (row r = ``dataset[r]``, id ``ids[r]``) into a cache at ``out``.

    ``encode`` gets a collated batch (a tensor of images, a list of strings, ...) and returns ``[b, dim]``.
    ``encoder`` names the frozen encoder (it is part of the cache's identity, with the ids, dtype and shard size).
    A complete matching cache is returned as is; a partial one is resumed; anything else needs ``overwrite``.
    ``progress(done_rows, total_rows)`` is called after each shard.
    """
    if len(ids) != len(dataset):
        raise ValueError(f"{len(ids)} ids for {len(dataset)} samples")
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique within a cache")
    if any("\n" in i for i in ids):
        raise ValueError("sample ids must not contain newlines")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    identity = {
        "format": FORMAT,
        "version": VERSION,
        "encoder": encoder,
        "modality": modality,
        "dtype": dtype,
        "count": len(ids),
        "shard_size": shard_size,
        "index_checksum": index_checksum(ids),
    }
    meta = _resume_or_start(root, identity, ids, overwrite)
    if meta["complete"]:
        return FeatureCache(root)
    meta["info"] = info or {}
    n_shards = -(-len(ids) // shard_size)
    for k in range(n_shards):
        if str(k) in meta["shards"]:
            continue
        start, end = k * shard_size, min(len(ids), (k + 1) * shard_size)
        features, missing = _compute_rows(encode, dataset, start, end, batch_size, num_workers, meta.get("dim"))
        meta["dim"] = int(features.shape[1])
        path = root / shard_name(k)
        _atomic_write(path, lambda f, a=features.astype(dtype): np.save(f, a), binary=True)
        meta["shards"][str(k)] = {"rows": end - start, "sha256": _sha256(path)}
        meta["missing"] = meta.get("missing", []) + [ids[r] for r in missing]
        _write_json(root / META, meta)
        if progress is not None:
            progress(end, len(ids))
    meta["complete"] = True
    _write_json(root / META, meta)
    return FeatureCache(root)


def _resume_or_start(root: Path, identity: dict[str, Any], ids: Sequence[str], overwrite: bool) -> dict[str, Any]:
    """The existing meta when it describes the same extraction (keeping only intact shards), else a fresh one."""
    meta_file = root / META
    if meta_file.is_file() and not overwrite:
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as err:
            raise DataError(f"{meta_file} is unreadable ({err}); pass overwrite to start again") from err
        differs = sorted(k for k, v in identity.items() if meta.get(k) != v)
        if differs:
            raise DataError(
                f"{root} already holds another feature cache (differs in {', '.join(differs)}); "
                "choose another folder or overwrite it"
            )
        # a shard renamed into place but not yet recorded, or damaged since, is recomputed
        meta["shards"] = {
            k: rec
            for k, rec in meta.get("shards", {}).items()
            if (root / shard_name(int(k))).is_file() and _sha256(root / shard_name(int(k))) == rec["sha256"]
        }
        if meta.get("complete") and len(meta["shards"]) < -(-len(ids) // identity["shard_size"]):
            meta["complete"] = False
        return meta
    for old in root.glob("shard_*.npy"):
        old.unlink()
    _write_json(root / IDS, list(ids))
    meta = {**identity, "dim": None, "complete": False, "shards": {}, "missing": []}
    _write_json(meta_file, meta)
    return meta


@torch.no_grad()
def _compute_rows(
    encode: Callable[[Any], torch.Tensor],
    dataset: Any,
    start: int,
    end: int,
    batch_size: int,
    num_workers: int,
    dim: int | None,
) -> tuple[np.ndarray, list[int]]:
    """Features of rows ``start..end`` (zeros for samples that failed to load) and those rows."""
    rows_set = _Rows(dataset, start, end)
    loader = DataLoader(rows_set, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    chunks: list[tuple[list[int], np.ndarray]] = []
    missing: list[int] = []
    for rows, items, bad in loader:
        missing += bad
        if items is None:
            continue
        feats = encode(items)
        if feats.ndim != 2 or feats.shape[0] != len(rows):
            raise ValueError(f"encode returned shape {tuple(feats.shape)} for a batch of {len(rows)}")
        chunks.append((rows, feats.detach().float().cpu().numpy()))
    if dim is None and not chunks:
        raise DataError(f"no sample in rows {start}..{end - 1} could be loaded")
    dim = chunks[0][1].shape[1] if chunks else dim
    out = np.zeros((end - start, dim), dtype=np.float32)
    for rows, feats in chunks:
        if feats.shape[1] != dim:
            raise ValueError(f"encode returned {feats.shape[1]}-d features, earlier batches were {dim}-d")
        out[np.asarray(rows) - start] = feats
    return out, missing


# ---- a config's image-text split through a CLIP tower ----------------------------------------------------
def split_samples(data: Any, split: str, spec: Any) -> tuple[list[str], list[Path], list[str], list[str]]:
    """Image ids and paths, caption ids and captions of ``data.<split>`` (ids unique, first occurrence kept)."""
    from vlprompt.data.sources import eval_set, is_video_format, train_set

    if is_video_format(data.format):
        raise DataError(f"feature extraction reads image-text data; data.format {data.format!r} is a video format")
    if split == "train":
        pairs = train_set(data, spec)
        image_paths, links = pairs.image_paths, pairs.pairs
    else:
        gallery_set = eval_set(data, split, spec)
        if gallery_set is None:
            raise DataError(f"data.{split} is empty: nothing to extract")
        gallery = gallery_set.dataset.gallery
        image_paths, links = gallery.image_paths, list(zip(gallery.txt2img, gallery.captions))
    image_ids = [image_sample_id(p, data.root) for p in image_paths]
    captions: dict[str, str] = {}
    for img, cap in links:
        captions.setdefault(caption_sample_id(image_ids[img], cap), cap)
    return image_ids, list(image_paths), list(captions), list(captions.values())


def extract_split_features(
    data: Any,
    split: str,
    modality: str,
    out: str | os.PathLike,
    backbone: Any,
    encoder: str,
    batch_size: int = 256,
    shard_size: int = 8192,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureCache:
    """Cache a frozen CLIP tower's embeddings (projected, unnormalised) of a config's images or captions.

    ``data`` is a config's ``data`` section, ``backbone`` a :class:`~vlprompt.backbone.Backbone`. Images go
    through the backbone's evaluation transform (teachers see no augmentation); captions through its tokenizer.
    """
    from vlprompt.data.sources import VisualSpec

    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    b = backbone.eval()
    spec = VisualSpec(b.preprocess_train, b.preprocess_val, b.image_size, b.image_mean, b.image_std)
    image_ids, image_paths, caption_ids, captions = split_samples(data, split, spec)
    max_words = data.max_words or None
    if modality == "image":
        ids, dataset = image_ids, ImageFiles(image_paths, b.preprocess_val)

        def encode(images: torch.Tensor) -> torch.Tensor:
            return b.encode_image(images)

    else:
        ids, dataset = caption_ids, captions

        def encode(texts: list[str]) -> torch.Tensor:
            return b.encode_text(b.tokenize(list(texts), max_words))

    info = {"split": split, "annotation": str(getattr(data, split)), "root": str(data.root)}
    return extract_features(
        encode, dataset, ids, out, encoder, modality, batch_size, shard_size, 0, dtype, overwrite, info, progress
    )
