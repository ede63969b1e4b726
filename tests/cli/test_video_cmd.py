"""``vlprompt video compress`` on a tiny folder with one broken file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlprompt.cli.main import main

av = pytest.importorskip("av")


def _write_video(path: Path, n: int = 6, h: int = 32, w: int = 48, fps: int = 6) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 30 * i, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_compress_reports_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _write_video(src / "good.mp4")
    _write_video(src / "tall.mp4", h=48, w=32)
    (src / "bad.mp4").write_bytes(b"garbage" * 20)
    argv = ["video", "compress", str(src), str(out), "--fps", "3", "--short-side", "32"]
    assert main([*argv, "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "compressed 2 video(s)" in captured.out and "1 skipped" in captured.out
    assert "bad.mp4" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["good.mp4", "tall.mp4"]
    with av.open(str(out / "tall.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.average_rate) == (32, 48, 3)
    # Re-run: the finished files are kept, the bad one is reported again; --strict turns that into status 1.
    assert main([*argv, "--strict"]) == 1
    assert "2 already done" in capsys.readouterr().out


def test_video_compress_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["video", "compress", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
