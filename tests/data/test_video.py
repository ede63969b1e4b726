"""Tests for video decoding, TSN frame sampling, frame folders, the frame cache and the frame transform."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlprompt.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    FrameCache,
    VideoBackendMissing,
    VideoTransform,
    frame_mask,
    read_frames,
    sample_indices,
)
from vlprompt.errors import DataError

av = pytest.importorskip("av")

from .videos import write_video  # noqa: E402


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Which source frame each decoded frame is, from its mean intensity."""
    return [round((float(f.float().mean()) - 10) / 20) for f in frames]


@pytest.fixture(scope="module")
def video10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "v10.mp4")


def test_sample_indices_uniform_is_segment_centres():
    # n=10, T=4: segments [0,1] [2,4] [5,6] [7,9]
    assert sample_indices(10, 4, "uniform") == [0, 3, 5, 8]
    assert sample_indices(12, 12, "uniform") == list(range(12))
    assert sample_indices(24, 12, "uniform") == list(range(0, 24, 2))
    with pytest.raises(ValueError):
        sample_indices(10, 4, "middle")
    with pytest.raises(ValueError):
        sample_indices(0, 4)


def test_sample_indices_random_within_segments_and_reproducible():
    segments = [(0, 1), (2, 4), (5, 6), (7, 9)]
    seen = set()
    for seed in range(50):
        idx = sample_indices(10, 4, "random", random.Random(seed))
        assert all(a <= i <= b for i, (a, b) in zip(idx, segments))
        assert idx == sample_indices(10, 4, "random", random.Random(seed))
        seen.add(tuple(idx))
    assert len(seen) > 10  # really random, not the centres


def test_sample_indices_short_video_repeats_last():
    assert sample_indices(3, 5, "uniform") == [0, 1, 2, 2, 2]
    assert sample_indices(3, 5, "random", random.Random(0)) == [0, 1, 2, 2, 2]
    assert frame_mask(3, 5).tolist() == [True, True, True, False, False]
    assert frame_mask(9, 5).all()


def test_read_frames_uniform_decodes_segment_centres(video10):
    frames, mask = read_frames(video10, 4, "uniform")
    assert frames.dtype == torch.uint8 and frames.shape == (4, 32, 48, 3)
    assert frame_ids(frames) == [0, 3, 5, 8]
    assert mask.dtype == torch.bool and mask.all()


def test_read_frames_random_is_seeded(video10):
    a, _ = read_frames(video10, 4, "random", random.Random(3))
    b, _ = read_frames(video10, 4, "random", random.Random(3))
    assert torch.equal(a, b)
    assert frame_ids(a) == sample_indices(10, 4, "random", random.Random(3))


def test_read_frames_short_video_pads_with_last_frame(tmp_path):
    frames, mask = read_frames(write_video(tmp_path / "short.mp4", n=3), 5, "uniform")
    assert frame_ids(frames) == [0, 1, 2, 2, 2]
    assert torch.equal(frames[3], frames[2]) and torch.equal(frames[4], frames[2])
    assert mask.tolist() == [True, True, True, False, False]


def test_read_frames_broken_videos_raise_data_error(tmp_path, video10):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.mp4"  # mp4 index at the end: the cut file has no index
    cut.write_bytes(video10.read_bytes()[: video10.stat().st_size // 2])
    full = write_video(tmp_path / "fast.mp4", n=30, faststart=True)
    short = tmp_path / "fast_cut.mp4"  # index first: the demuxer would silently stop early
    short.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for path in (garbage, empty, cut, short, tmp_path / "missing.mp4"):
        with pytest.raises(DataError, match=path.name):
            read_frames(path, 4)


def test_missing_pyav_names_the_extra(monkeypatch, video10):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(VideoBackendMissing, match=r"vlprompt\[video\]"):
        read_frames(video10, 4)


def test_frame_folder_backend_natural_order(tmp_path):
    folder = tmp_path / "vid"
    folder.mkdir()
    for i in range(10):  # frame_2 must come before frame_10
        Image.new("RGB", (48, 32), (20 * i + 10,) * 3).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("ignored")
    frames, mask = read_frames(folder, 4, "uniform")
    assert frames.shape == (4, 32, 48, 3) and mask.all()
    assert frame_ids(frames) == [0, 3, 5, 8]
    assert frames[0, 0, 0].tolist() == [10, 10, 10]  # png is lossless
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        read_frames(empty, 4)


def test_frame_cache_uniform_only_and_lru(video10, tmp_path):
    cache = FrameCache(max_items=1)
    a, _ = read_frames(video10, 4, "uniform", cache=cache)
    a[:] = 0  # editing a result must not change the cache
    b, mask = read_frames(video10, 4, "uniform", cache=cache)
    assert cache.hits == 1 and cache.misses == 1 and len(cache) == 1
    assert frame_ids(b) == [0, 3, 5, 8] and mask.all()
    read_frames(video10, 4, "random", random.Random(0), cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    other = write_video(tmp_path / "other.mp4", n=4)
    read_frames(other, 4, "uniform", cache=cache)  # evicts video10
    assert len(cache) == 1 and cache.get(video10, 4) is None and cache.get(other, 4) is not None
    assert cache.nbytes == 4 * 32 * 48 * 3


def test_transform_shape_and_normalisation():
    frames = torch.full((2, 32, 48, 3), 128, dtype=torch.uint8)
    out = VideoTransform(16)(frames)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expected, atol=1e-4)
    custom = VideoTransform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(frames)
    assert torch.allclose(custom, torch.full_like(custom, 128 / 255 * 2 - 1), atol=1e-4)


def test_transform_resizes_short_side_then_centre_crops():
    # Columns numbered 0..47: after a crop without resize the centre 32 columns are 8..39.
    cols = torch.arange(48, dtype=torch.uint8).view(1, 1, 48, 1).expand(1, 32, 48, 3).contiguous()
    plain = VideoTransform(32, mean=(0, 0, 0), std=(1, 1, 1))(cols)  # short side already 32: no resize
    assert plain.shape == (1, 3, 32, 32)
    assert torch.allclose(plain[0, 0, 0] * 255, torch.arange(8, 40, dtype=torch.float32), atol=1e-4)
    portrait = torch.zeros(1, 48, 32, 3, dtype=torch.uint8)
    assert VideoTransform(16)(portrait).shape == (1, 3, 16, 16)
    # Reference mode (crop only): a small frame is zero-padded, not upscaled.
    small = torch.full((1, 8, 8, 3), 255, dtype=torch.uint8)
    padded = VideoTransform(16, mean=(0, 0, 0), std=(1, 1, 1), resize=False)(small)
    assert padded.shape == (1, 3, 16, 16) and padded.sum() == 3 * 64
    with pytest.raises(ValueError):
        VideoTransform((16, 24))
