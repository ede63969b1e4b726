"""Text-video retrieval annotations in the CLIP4Clip/DGL formats, and the torch Datasets over them.

Every reader is pure parsing into a :class:`VideoTextSplit`: videos in a fixed order, all their captions, and
``txt2vid`` linking each caption to its video, so one video may have many captions (multi-sentence evaluation,
which the DGL reference crashes on, works on it directly). Paragraph datasets (ActivityNet, DiDeMo) join a
video's sentences into one caption. Annotation files live in ``ann_dir``, media under ``video_root``; a video is
found as ``{video_root}/{id}`` (a file or a folder of frames), ``{video_root}/{id}{ext}`` for the usual
extensions, or else anywhere below ``video_root`` by its file stem, the way the reference loaders walk the tree.

Datasets drop videos whose files are missing at construction (their captions go too, and ``txt2vid`` is
renumbered) and return ``None`` for a video that fails to decode (use
:func:`~vlprompt.data.collate.collate_skip_none`); ``strict=True`` raises instead. ``.split`` on a dataset is the
cleaned split: evaluate against its captions and ``txt2vid``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlprompt.data.media import MISSING, UNREADABLE, BadSamples, log
from vlprompt.data.video import MODES, VIDEO_EXTENSIONS, FrameCache, VideoBackendMissing, read_frames
from vlprompt.errors import DataError
from vlprompt.safe_pickle import load_pickle

PathLike = str | os.PathLike
FrameTransform = Callable[[torch.Tensor], Any]


@dataclass
class VideoTextSplit:
    """Videos and their captions; ``txt2vid[j]`` is the index of caption j's video."""

    video_ids: list[str]
    video_paths: list[Path]
    captions: list[str]
    txt2vid: list[int]

    @property
    def num_videos(self) -> int:
        """Number of videos."""
        return len(self.video_ids)

    @property
    def vid2txt(self) -> list[list[int]]:
        """Video index -> its caption indices."""
        out: list[list[int]] = [[] for _ in self.video_ids]
        for t, v in enumerate(self.txt2vid):
            out[v].append(t)
        return out

    def subset(self, keep: Iterable[int]) -> VideoTextSplit:
        """The split restricted to the given video indices (in their order), captions renumbered to match."""
        keep = list(keep)
        new = {v: i for i, v in enumerate(keep)}
        pairs = [(c, new[v]) for c, v in zip(self.captions, self.txt2vid) if v in new]
        pairs.sort(key=lambda p: p[1])  # stable: captions stay in file order within a video
        return VideoTextSplit(
            [self.video_ids[v] for v in keep],
            [self.video_paths[v] for v in keep],
            [c for c, _ in pairs],
            [v for _, v in pairs],
        )


# ------------------------------------------------------------------------------------------- shared helpers


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except FileNotFoundError as e:
        raise DataError(f"annotation file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def _read_list(path: Path) -> list[str]:
    """One id per line; blank lines ignored."""
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header that must contain ``columns``."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: header {reader.fieldnames} lacks column(s) {missing}")
    rows = []
    for row in reader:
        empty = [c for c in columns if not (row.get(c) or "").strip()]
        if empty:
            raise DataError(f"{path}: line {reader.line_num}: empty {empty[0]!r}")
        rows.append({c: row[c].strip() for c in columns})
    return rows


def _check_str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise DataError(f"{where}: expected a list of strings, got {type(value).__name__}")
    return value


def _check_dict(value: Any, path: Path, what: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object ({what}), got {type(value).__name__}")
    return value


def _paragraph(sentences: Iterable[str]) -> str:
    return " ".join(s.strip() for s in sentences if s.strip())


class _VideoLocator:
    """Finds a video's file or frame folder under a root; walks the tree once, only if a direct guess fails."""

    def __init__(self, root: Path, path_map: dict[str, str] | None = None) -> None:
        self.root = root
        self.path_map = path_map or {}
        self._by_stem: dict[str, Path] | None = None

    def _walk(self) -> dict[str, Path]:
        if self._by_stem is None:
            self._by_stem = {}
            for dirpath, _, files in os.walk(self.root):
                for f in sorted(files):
                    if f.lower().endswith(VIDEO_EXTENSIONS):
                        self._by_stem.setdefault(f, Path(dirpath, f))
                        self._by_stem.setdefault(os.path.splitext(f)[0], Path(dirpath, f))
        return self._by_stem

    def __call__(self, *names: str) -> Path:
        """The first existing candidate for any of ``names`` (tried in order), else the default .mp4 path."""
        for name in names:
            if name in self.path_map:
                return self.root / self.path_map[name]
        for name in names:
            for cand in (self.root / name, *(self.root / f"{name}{ext}" for ext in VIDEO_EXTENSIONS)):
                if cand.exists():
                    return cand
        if self.root.is_dir():
            found = self._walk()
            for name in names:
                if name in found:
                    return found[name]
        return self.root / f"{names[0]}.mp4"  # reported as missing by the dataset


def _path_map(ann_dir: Path, name: str = "video_path.json") -> dict[str, str] | None:
    path = ann_dir / name
    if not path.is_file():
        return None
    mapping = _check_dict(_read_json(path), path, "id -> relative video path")
    bad = next((k for k, v in mapping.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad!r}: the path must be a string, got {type(mapping[bad]).__name__}")
    return mapping


def _build(
    video_ids: Sequence[str],
    captions: dict[str, list[str]],
    locate: Callable[[str], Path],
    source: PathLike,
) -> VideoTextSplit:
    """Assemble a split in ``video_ids`` order; videos without captions are dropped with a warning."""
    ids = list(dict.fromkeys(video_ids))
    uncaptioned = [v for v in ids if not captions.get(v)]
    if uncaptioned:
        log.warning("%s: %d video(s) have no captions and are skipped, e.g. %s", source, len(uncaptioned),
                    uncaptioned[0])  # fmt: skip
    ids = [v for v in ids if captions.get(v)]
    if not ids:
        raise DataError(f"{source}: no captioned videos in this split")
    caps: list[str] = []
    txt2vid: list[int] = []
    for i, v in enumerate(ids):
        caps.extend(captions[v])
        txt2vid.extend([i] * len(captions[v]))
    return VideoTextSplit(ids, [locate(v) for v in ids], caps, txt2vid)


def _split_file(split: str, files: dict[str, str], override: str | None) -> str:
    if override is not None:
        return override
    if split not in files:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(files)}")
    return files[split]


# ------------------------------------------------------------------------------------------------- readers


def read_msrvtt(
    ann_dir: PathLike,
    video_root: PathLike,
    split: str = "train",
    csv_name: str | None = None,
    data_json: str = "MSRVTT_data.json",
) -> VideoTextSplit:
    """MSR-VTT (CLIP4Clip layout). train: ``MSRVTT_train.9k.csv`` (or ``csv_name="MSRVTT_train.7k.csv"``),
    column ``video_id``, captions from ``MSRVTT_data.json``; val/test: ``val.csv`` / ``MSRVTT_JSFUSION_test.csv``
    (``key,vid_key,video_id,sentence``, one row per caption). Videos: ``{video_root}/{video_id}.mp4``."""
    ann_dir, root = Path(ann_dir), Path(video_root)
    name = _split_file(
        split, {"train": "MSRVTT_train.9k.csv", "val": "val.csv", "test": "MSRVTT_JSFUSION_test.csv"}, csv_name
    )
    path = ann_dir / name
    locate = _VideoLocator(root)
    captions: dict[str, list[str]] = {}
    if split == "train":
        ids = [r["video_id"] for r in _read_csv(path, ["video_id"])]
        wanted = set(ids)
        jpath = ann_dir / data_json
        data = _check_dict(_read_json(jpath), jpath, '{"videos": [...], "sentences": [...]}')
        sentences = data.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{jpath}: missing list 'sentences'")
        for i, s in enumerate(sentences):
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("video_id"), str)
                or not isinstance(s.get("caption"), str)
            ):
                raise DataError(f"{jpath}: sentences record {i}: expected {{'video_id': str, 'caption': str}}")
            if s["video_id"] in wanted:
                captions.setdefault(s["video_id"], []).append(s["caption"])
    else:
        rows = _read_csv(path, ["video_id", "sentence"])
        ids = [r["video_id"] for r in rows]
        for r in rows:
            captions.setdefault(r["video_id"], []).append(r["sentence"])
    return _build(ids, captions, locate, path)


def read_vatex(
    ann_dir: PathLike, video_root: PathLike, split: str = "train", list_name: str | None = None
) -> VideoTextSplit:
    """VATEX: ``ref_captions.json`` {video_id: [captions]} and ``{train,test}_list.txt``; val uses the test list
    as in the reference (pass ``list_name`` for a real val list). Multi-sentence."""
    ann_dir = Path(ann_dir)
    name = _split_file(split, {"train": "train_list.txt", "val": "test_list.txt", "test": "test_list.txt"}, list_name)
    ids = _read_list(ann_dir / name)
    cpath = ann_dir / "ref_captions.json"
    refs = _check_dict(_read_json(cpath), cpath, "video_id -> [captions]")
    captions = {v: _check_str_list(refs[v], f"{cpath}: record {v!r}") for v in ids if v in refs}
    return _build(ids, captions, _VideoLocator(Path(video_root)), ann_dir / name)


LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}


def read_lsmdc(
    ann_dir: PathLike, video_root: PathLike, split: str = "train", csv_name: str | None = None
) -> VideoTextSplit:
    """LSMDC: tab-separated lines ``clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence``;
    ``video_path.json`` (optional) maps clip_id to a path relative to ``video_root``."""
    ann_dir = Path(ann_dir)
    path = ann_dir / _split_file(split, LSMDC_FILES, csv_name)
    ids: list[str] = []
    captions: dict[str, list[str]] = {}
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            raise DataError(f"{path}: line {n}: expected 6 tab-separated fields, got {len(fields)}")
        clip, sentence = fields[0].strip(), fields[5].strip()
        if not clip or not sentence:
            raise DataError(f"{path}: line {n}: empty clip id or sentence")
        ids.append(clip)
        captions.setdefault(clip, []).append(sentence)
    return _build(ids, captions, _VideoLocator(Path(video_root), _path_map(ann_dir)), path)


def read_activitynet(
    ann_dir: PathLike, video_root: PathLike, split: str = "train", exclude: Iterable[str] = ()
) -> VideoTextSplit:
    """ActivityNet Captions as paragraphs: ``{train,val}_ids.json`` (``v_<id>``), ``train.json`` / ``val_1.json``
    ({v_id: {duration, timestamps, sentences}}), optional ``video_path.json`` {id without "v_": file}.

    test reads the val files, as the reference does. The reference also drops video ``NHznDFD3V3k`` (its file
    is broken in the common download); pass ``exclude=["v_NHznDFD3V3k"]`` to match it.
    """
    ann_dir = Path(ann_dir)
    ids_name = _split_file(split, {"train": "train_ids.json", "val": "val_ids.json", "test": "val_ids.json"}, None)
    cap_name = {"train": "train.json", "val": "val_1.json", "test": "val_1.json"}[split]
    ids_path, cap_path = ann_dir / ids_name, ann_dir / cap_name
    ids = _check_str_list(_read_json(ids_path), str(ids_path))
    skip = {e.removeprefix("v_") for e in exclude}
    ids = [v for v in ids if v.removeprefix("v_") not in skip]
    data = _check_dict(_read_json(cap_path), cap_path, "v_id -> {duration, timestamps, sentences}")
    captions: dict[str, list[str]] = {}
    for v in ids:
        if v not in data:
            raise DataError(f"{cap_path}: no record for video {v!r} listed in {ids_path}")
        rec = data[v]
        sents = rec.get("sentences") if isinstance(rec, dict) else None
        text = _paragraph(_check_str_list(sents, f"{cap_path}: record {v!r} 'sentences'"))
        captions[v] = [text] if text else []
    path_map = _path_map(ann_dir)
    locate = _VideoLocator(Path(video_root), path_map)
    return _build(ids, captions, lambda v: locate(v.removeprefix("v_"), v), ids_path)


def read_msvd(
    ann_dir: PathLike, video_root: PathLike, split: str = "train", list_name: str | None = None
) -> VideoTextSplit:
    """MSVD: ``raw-captions.pkl`` {vid: [token lists]} (tokens joined with spaces) and ``{train,val,test}_list.txt``
    (``list_name`` picks e.g. ``train_list_120.txt``). Multi-sentence."""
    ann_dir = Path(ann_dir)
    name = _split_file(split, {s: f"{s}_list.txt" for s in ("train", "val", "test")}, list_name)
    ids = _read_list(ann_dir / name)
    ppath = ann_dir / "raw-captions.pkl"
    raw = load_pickle(ppath, kind="caption pickle")  # builtin containers only: captions carry no code
    if not isinstance(raw, dict):
        raise DataError(f"{ppath}: expected a dict {{vid: [token lists]}}, got {type(raw).__name__}")
    captions: dict[str, list[str]] = {}
    for v in ids:
        if v not in raw:
            continue
        caps = raw[v]
        if not isinstance(caps, list):
            raise DataError(f"{ppath}: record {v!r}: expected a list of token lists")
        joined = []
        for c in caps:
            tokens = [c] if isinstance(c, str) else list(c) if isinstance(c, (list, tuple)) else c
            joined.append(" ".join(_check_str_list(tokens, f"{ppath}: record {v!r}")))
        captions[v] = joined
    return _build(ids, captions, _VideoLocator(Path(video_root)), ann_dir / name)


def read_didemo(ann_dir: PathLike, video_root: PathLike, split: str = "train") -> VideoTextSplit:
    """DiDeMo as paragraphs: ``{split}_data.json`` [{video, times, description}], descriptions joined per video;
    ``{split}_list.txt`` restricts the videos when present."""
    ann_dir = Path(ann_dir)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected one of ['test', 'train', 'val']")
    jpath = ann_dir / f"{split}_data.json"
    records = _read_json(jpath)
    if not isinstance(records, list):
        raise DataError(f"{jpath}: expected a JSON list of records, got {type(records).__name__}")
    descriptions: dict[str, list[str]] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("video"), str) or not isinstance(r.get("description"), str):
            raise DataError(f"{jpath}: record {i}: expected {{'video': str, 'times': [...], 'description': str}}")
        descriptions.setdefault(r["video"], []).append(r["description"])
    list_path = ann_dir / f"{split}_list.txt"
    ids = _read_list(list_path) if list_path.is_file() else list(descriptions)
    captions = {v: [_paragraph(d)] for v, d in descriptions.items() if _paragraph(d)}
    return _build(ids, captions, _VideoLocator(Path(video_root)), jpath)


VIDEO_READERS: dict[str, Callable[..., VideoTextSplit]] = {
    "msrvtt": read_msrvtt,
    "vatex": read_vatex,
    "lsmdc": read_lsmdc,
    "activitynet": read_activitynet,
    "msvd": read_msvd,
    "didemo": read_didemo,
}


def read_video_split(
    format: str, ann_dir: PathLike, video_root: PathLike, split: str = "train", **kwargs: Any
) -> VideoTextSplit:
    """Dispatch to the reader named ``format`` (a key of VIDEO_READERS)."""
    if format not in VIDEO_READERS:
        raise ValueError(f"unknown video dataset format {format!r}; expected one of {sorted(VIDEO_READERS)}")
    return VIDEO_READERS[format](ann_dir, video_root, split, **kwargs)


# ------------------------------------------------------------------------------------------------ datasets


def drop_missing_videos(split: VideoTextSplit, bad: BadSamples, strict: bool) -> VideoTextSplit:
    """The split without videos whose file or frame folder does not exist (recorded in ``bad``; strict: raise)."""
    missing = [i for i, p in enumerate(split.video_paths) if not p.exists()]
    if not missing:
        return split
    if strict:
        shown = ", ".join(str(split.video_paths[i]) for i in missing[:5])
        raise DataError(f"{len(missing)} of {split.num_videos} video file(s) are missing: {shown}")
    for i in missing:
        bad.add(split.video_paths[i], MISSING)
    gone = set(missing)
    kept = split.subset(i for i in range(split.num_videos) if i not in gone)
    if not kept.num_videos:
        raise DataError(f"none of the {split.num_videos} videos exist (e.g. {split.video_paths[0]})")
    log.warning("%d of %d videos missing (e.g. %s)", len(missing), split.num_videos, split.video_paths[missing[0]])
    return kept


class _VideoDataset(Dataset):
    def __init__(
        self,
        split: VideoTextSplit,
        num_frames: int,
        transform: FrameTransform | None,
        strict: bool,
        cache: FrameCache | None,
    ) -> None:
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.bad_samples = BadSamples()
        self.split = drop_missing_videos(split, self.bad_samples, strict)
        self.num_frames = num_frames
        self.transform = transform
        self.strict = strict
        self.cache = cache

    @property
    def num_videos(self) -> int:
        """Videos left after dropping missing files."""
        return self.split.num_videos

    def _load(self, v: int, mode: str, rng: random.Random | None) -> tuple[Any, torch.Tensor] | None:
        path = self.split.video_paths[v]
        try:
            frames, mask = read_frames(path, self.num_frames, mode, rng, self.cache)
        except VideoBackendMissing:
            raise  # every video would fail: not a per-sample problem
        except DataError as e:
            if self.strict:
                raise
            gone = isinstance(e.__cause__, FileNotFoundError) or not path.exists()
            self.bad_samples.add(path, MISSING if gone else UNREADABLE, str(e.__cause__ or e))
            return None
        return (self.transform(frames) if self.transform is not None else frames), mask


class VideoTextPairs(_VideoDataset):
    """Training pairs: item = (frames [T, 3, S, S], mask [T], caption, video_index), or None if the video fails.

    ``expand_sentences=True`` (default): every caption is a sample. False: one sample per video with one of its
    captions drawn at random per epoch. Random frame and caption draws depend only on (seed, epoch, index), so they
    do not depend on worker count; call :meth:`set_epoch` before each epoch (not seen by persistent workers).
    """

    def __init__(
        self,
        split: VideoTextSplit,
        num_frames: int,
        transform: FrameTransform | None,
        mode: str = "random",
        strict: bool = False,
        seed: int = 0,
        expand_sentences: bool = True,
        cache: FrameCache | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(split, num_frames, transform, strict, cache)
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        self.expand_sentences = expand_sentences
        self._vid2txt = self.split.vid2txt

    def set_epoch(self, epoch: int) -> None:
        """Change the random frame (and caption) draws for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split.captions) if self.expand_sentences else self.split.num_videos

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, str, int] | None:
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")  # str seeds are hashed stably across processes
        if self.expand_sentences:
            caption, v = self.split.captions[i], self.split.txt2vid[i]
        else:
            v = i
            caption = self.split.captions[rng.choice(self._vid2txt[v])]
        out = self._load(v, self.mode, rng)
        return None if out is None else (out[0], out[1], caption, v)


class GalleryVideos(_VideoDataset):
    """Evaluation videos, centre frames of each segment: item = (frames, mask, video_index), or None."""

    def __init__(
        self,
        split: VideoTextSplit,
        num_frames: int,
        transform: FrameTransform | None,
        strict: bool = False,
        cache: FrameCache | None = None,
    ) -> None:
        super().__init__(split, num_frames, transform, strict, cache)

    def __len__(self) -> int:
        return self.split.num_videos

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, int] | None:
        out = self._load(i, "uniform", None)
        return None if out is None else (out[0], out[1], i)
