"""Video decoding (PyAV) or frame folders, TSN frame sampling, an LRU frame cache and the frame transform.

Sampling follows the DGL/CLIP4Clip PyAV path: every frame is decoded (videos are pre-compressed to about 3 fps,
see :mod:`vlprompt.data.compress`), the n frames are split into T equal segments, segment i being frames
``[i*n//T, (i+1)*n//T - 1]``, and one frame is taken from each: a random one for training (``mode="random"``),
the centre ``(first + last) // 2`` for evaluation (``mode="uniform"``). A video with n < T frames gives all its
frames followed by copies of the last one, and the mask marks only the n real frames as valid.

A broken video (corrupt, truncated, empty, no video stream) raises :class:`~vlprompt.errors.DataError`; it never
becomes a silent zero tensor. Datasets turn that into a skipped sample (see :mod:`vlprompt.data.video_datasets`).
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlprompt.data.media import is_image_file, load_image
from vlprompt.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv")
MODES = ("uniform", "random")

# OpenAI CLIP's normalisation (open_clip's OPENAI_DATASET_MEAN/STD); pass the backbone's own values if it differs.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A container that declares N frames but yields fewer than N - slack is treated as truncated; the slack allows for
# frames an mp4 edit list legitimately hides.
_TRUNCATION_SLACK = 0.05


class VideoBackendMissing(DataError):
    """PyAV is not installed; not a property of one file, so datasets re-raise it instead of skipping."""


def import_av() -> Any:
    """Import PyAV, or raise a DataError saying which extra installs it."""
    try:
        import av
    except ImportError as e:
        raise VideoBackendMissing(
            "decoding videos needs PyAV: pip install 'vlprompt[video]' (or pip install av)"
        ) from e
    return av


def is_video_file(name: str) -> bool:
    """True if the file name has one of the accepted video extensions (any case)."""
    return name.lower().endswith(VIDEO_EXTENSIONS)


# --------------------------------------------------------------------------------------------------- sampling


def sample_indices(n: int, num_frames: int, mode: str = "uniform", rng: random.Random | None = None) -> list[int]:
    """TSN segment sampling of ``num_frames`` indices from ``n`` frames (short videos: repeat the last frame)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n <= 0:
        raise ValueError("cannot sample from a video with no frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if n <= num_frames:
        return list(range(n)) + [n - 1] * (num_frames - n)
    rng = rng if rng is not None else random
    out = []
    for i in range(num_frames):
        # Integer edges: every segment has at least one frame because n > num_frames.
        first, last = i * n // num_frames, (i + 1) * n // num_frames - 1
        out.append(rng.randint(first, last) if mode == "random" else (first + last) // 2)
    return out


def frame_mask(n: int, num_frames: int) -> torch.Tensor:
    """Bool [num_frames]: True for the min(n, num_frames) real frames, False for repeated padding."""
    mask = torch.zeros(num_frames, dtype=torch.bool)
    mask[: min(n, num_frames)] = True
    return mask


# --------------------------------------------------------------------------------------------------- decoding


def _decode_video_file(path: Path) -> list[Any]:
    """Every frame of the first video stream as PyAV frames (converted to RGB only when selected)."""
    av = import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"no video stream in {path}")
            stream = container.streams.video[0]
            declared = stream.frames
            frames = list(container.decode(stream))
    except FileNotFoundError as e:
        raise DataError(f"video file not found: {path}") from e
    except (av.FFmpegError, OSError, ValueError, IndexError, RuntimeError) as e:
        raise DataError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise DataError(f"video {path} has no decodable frames")
    if declared > 0 and len(frames) < declared * (1 - _TRUNCATION_SLACK) - 1:
        raise DataError(f"video {path} is truncated: decoded {len(frames)} of {declared} frames")
    return frames


def _natural_key(name: str) -> list[Any]:
    # frame_2.jpg before frame_10.jpg, however the extractor padded its numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frame_files(folder: Path) -> list[Path]:
    """Image files of a pre-extracted frame folder, in name order (numbers compared numerically)."""
    try:
        names = [n for n in os.listdir(folder) if is_image_file(n) and not n.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list frame folder {folder}: {e}") from e
    if not names:
        raise DataError(f"frame folder {folder} holds no image files")
    return [folder / n for n in sorted(names, key=_natural_key)]


def _stack(arrays: Sequence[np.ndarray], path: Path) -> torch.Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"frames of {path} differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays))


def _open_source(path: Path) -> tuple[int, Callable[[int], np.ndarray]]:
    """Frame count and a function that gives frame i as RGB uint8 [H, W, 3], for a file or a frame folder."""
    if path.is_dir():
        files = list_frame_files(path)
        return len(files), lambda i: np.asarray(load_image(files[i]))
    decoded = _decode_video_file(path)
    return len(decoded), lambda i: decoded[i].to_ndarray(format="rgb24")


# ----------------------------------------------------------------------------------------------------- cache


class FrameCache:
    """In-memory LRU of uniformly sampled frames, for repeated evaluation epochs.

    Keyed by (path, num_frames); random sampling is never cached (it must differ between epochs). Each DataLoader
    worker process holds its own copy, so size it per worker.
    """

    def __init__(self, max_items: int = 256, max_bytes: int | None = None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of frame data currently held."""
        return self._bytes

    def get(self, path: str | os.PathLike, num_frames: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (frames, mask), or None."""
        key = (str(path), num_frames)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
        # Copies, so a caller that edits its frames in place cannot change the cache.
        return item[0].clone(), item[1].clone()

    def put(self, path: str | os.PathLike, num_frames: int, frames: torch.Tensor, mask: torch.Tensor) -> None:
        """Store (frames, mask), evicting the least recently used entries beyond the limits."""
        size = frames.numel() * frames.element_size()
        if self.max_items <= 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        key = (str(path), num_frames)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[0].numel() * old[0].element_size()
            self._items[key] = (frames.clone(), mask.clone())
            self._bytes += size
            while len(self._items) > self.max_items or (self.max_bytes is not None and self._bytes > self.max_bytes):
                _, (f, _) = self._items.popitem(last=False)
                self._bytes -= f.numel() * f.element_size()


def read_frames(
    path: str | os.PathLike,
    num_frames: int,
    mode: str = "uniform",
    rng: random.Random | None = None,
    cache: FrameCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_frames`` frames of a video file or frame folder: (uint8 [T, H, W, 3], bool mask [T]).

    ``rng`` drives ``mode="random"`` (default: the ``random`` module). ``cache`` is used for ``mode="uniform"``
    only. Raises DataError for a missing, corrupt, truncated or empty video.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    use_cache = cache is not None and mode == "uniform"
    if use_cache:
        hit = cache.get(path, num_frames)
        if hit is not None:
            return hit
    path = Path(path)
    if not path.exists():
        raise DataError(f"video not found: {path}")
    n, get = _open_source(path)
    idx = sample_indices(n, num_frames, mode, rng)
    arrays = {i: get(i) for i in dict.fromkeys(idx)}  # repeated indices are converted once
    frames = _stack([arrays[i] for i in idx], path)
    mask = frame_mask(n, num_frames)
    if use_cache:
        cache.put(path, num_frames, frames, mask)
    return frames, mask


# ------------------------------------------------------------------------------------------------- transform


class VideoTransform:
    """uint8 frames [T, H, W, 3] -> normalised float [T, 3, S, S]: resize short side to S, centre crop, normalise.

    The same for training and evaluation and without flips, like DGL. ``resize=False`` reproduces the reference's
    crop-only transform (it assumes videos already have a short side of S; smaller frames are zero-padded).
    Take ``image_size``, ``mean`` and ``std`` from the backbone (open_clip's ``model.visual.preprocess_cfg``).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resize: bool = True,
    ) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"expected a square image size, got {image_size!r}")
        self.size = int(size[0])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.resize = resize

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [T, H, W, 3], got {tuple(frames.shape)}")
        x = frames.permute(0, 3, 1, 2).float().div_(255)
        h, w = x.shape[-2:]
        s = self.size
        if self.resize and min(h, w) != s:
            # torchvision's Resize(int) rule: the short side becomes s, the long side is truncated.
            nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
            h, w = nh, nw
        if h < s or w < s:
            # Pad like torchvision's CenterCrop does for small images (only reachable with resize=False).
            ph, pw = max(s - h, 0), max(s - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = x.shape[-2:]
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        x = x[..., top : top + s, left : left + s]
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"VideoTransform(size={self.size}, resize={self.resize})"
