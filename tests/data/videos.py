"""A test helper: tiny mp4 files whose frames can be told apart by their grey level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")


def write_video(path: Path, n: int = 10, h: int = 32, w: int = 48, fps: int = 10, faststart: bool = False) -> Path:
    """Frame i is flat grey 20*i + 10, so decoded intensities tell which frames were sampled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qmin": "2", "qmax": "2"}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), (20 * i + 10) % 250, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
