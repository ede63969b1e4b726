"""Tests for video pre-compression: aspect ratio, frame-rate resampling, atomic writes and the folder runner."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from vlprompt.data import compress
from vlprompt.data.compress import compress_video, compress_videos, output_size
from vlprompt.errors import DataError

av = pytest.importorskip("av")

from .videos import write_video  # noqa: E402


def probe(path: Path) -> tuple[int, int, Fraction, list[int]]:
    """(width, height, average rate, source frame ids) of a written video."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert len(c.streams) == 1
        return s.width, s.height, s.average_rate, [round((float(f.mean()) - 10) / 20) for f in frames]


def test_output_size_keeps_aspect_and_even_sides():
    assert output_size(640, 360, 224) == (398, 224)
    assert output_size(360, 640, 224) == (224, 398)  # the reference would give 224 x 126
    assert output_size(100, 100, 224) == (224, 224)
    assert output_size(48, 32, 33) == (50, 34)


def test_portrait_keeps_aspect_ratio_and_downsamples_fps(tmp_path):
    src = write_video(tmp_path / "portrait.mp4", n=10, h=48, w=32, fps=10)
    info = compress_video(src, tmp_path / "out" / "p.mp4", fps=5, short_side=16)
    w, h, rate, ids = probe(tmp_path / "out" / "p.mp4")
    assert (w, h) == (16, 24) and rate == 5
    assert ids == [0, 2, 4, 6, 8]  # output time k/5 shows the latest input frame at or before it
    assert info["frames"] == 5 and (info["width"], info["height"]) == (16, 24)


def test_upsampling_fps_repeats_frames_and_mpeg4_fallback(tmp_path):
    src = write_video(tmp_path / "slow.mp4", n=4, fps=2)
    info = compress_video(src, tmp_path / "fast.mp4", fps=4, short_side=32, codec="mpeg4")
    w, h, rate, ids = probe(tmp_path / "fast.mp4")
    assert info["codec"] == "mpeg4" and (w, h) == (48, 32) and rate == 4
    assert ids == [0, 0, 1, 1, 2, 2, 3, 3]


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01junk" * 100)
    with pytest.raises(DataError, match="garbage.mp4"):
        compress_video(garbage, tmp_path / "out" / "g.mp4")
    src = write_video(tmp_path / "ok.mp4")

    def interrupted(av, src, tmp, *args):
        tmp.write_bytes(b"half a video")
        raise KeyboardInterrupt

    monkeypatch.setattr(compress, "_transcode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_video(src, tmp_path / "out" / "ok.mp4")
    assert list((tmp_path / "out").iterdir()) == []


def test_compress_folder_reports_bad_files_and_resumes(tmp_path):
    src = tmp_path / "in"
    write_video(src / "a.mp4")
    write_video(src / "sub" / "b.mp4", n=3)
    (src / "broken.avi").write_bytes(b"not a video")
    (src / "notes.txt").write_text("ignored")
    seen = []
    report = compress_videos(src, tmp_path / "out", fps=5, short_side=16, progress=lambda r, e: seen.append(r))
    assert report["done"] == ["a.mp4", "sub/b.mp4"] and list(report["skipped"]) == ["broken.avi"]
    assert "broken.avi" in report["skipped"]["broken.avi"] and sorted(seen) == ["a.mp4", "broken.avi", "sub/b.mp4"]
    outputs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    assert outputs == ["a.mp4", "sub", "sub/b.mp4"]  # no partial file for the broken one
    assert probe(tmp_path / "out" / "sub" / "b.mp4")[:2] == (24, 16)
    again = compress_videos(src, tmp_path / "out", fps=5, short_side=16)
    assert again["done"] == [] and again["already_done"] == ["a.mp4", "sub/b.mp4"]
    with pytest.raises(DataError, match="differ"):
        compress_videos(src, src)
