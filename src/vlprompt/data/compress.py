"""Video pre-compression (PyAV): short side to 224, 3 fps, video stream only, as CLIP4Clip/DGL expect.

Differences from the reference ``preprocess/compress_video.py`` (ffmpeg ``scale=W:H -r 3``): portrait videos keep
their aspect ratio (the reference squashes them to width 224, see the DGL spec, section 8), both sides are even, and
outputs are written atomically (a hidden ``.partial`` file renamed into place), so an interrupted run never leaves
a half-written video and a re-run skips the finished ones. Rotation metadata (phone videos) is not applied.

Frame-rate conversion picks, for each output time k/fps, the latest input frame shown at that time (timestamps are
compared exactly as fractions); the output lasts as long as the input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from pathlib import Path
from typing import Any

from vlprompt.data.video import import_av, is_video_file
from vlprompt.errors import DataError

Progress = Callable[[str, str | None], None]  # (input path relative to IN, error or None)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side``, aspect ratio kept, both even."""

    def even(x: float) -> int:
        return max(2, 2 * int(x / 2 + 0.5))  # halves round up (round() would round 33 down to 32)

    if width <= height:
        return even(short_side), even(height * short_side / width)
    return even(width * short_side / height), even(short_side)


def _pick_codec(av: Any, codec: str | None) -> str:
    if codec is not None:
        return codec
    try:
        av.Codec("libx264", "w")
        return "libx264"
    except Exception:  # av raises its own UnknownCodecError type, which differs between versions
        return "mpeg4"


def _frame_time(frame: Any, fallback_base: Fraction | None, index: int, rate: Fraction | None) -> Fraction:
    base = frame.time_base or fallback_base
    if frame.pts is not None and base is not None:
        return frame.pts * Fraction(base)
    return Fraction(index) / (rate or 25)  # no timestamps at all: assume a constant rate


def _transcode(av: Any, src: Path, tmp: Path, rate: Fraction, short_side: int, codec: str) -> dict[str, Any]:
    with av.open(str(src)) as inp:
        if not inp.streams.video:
            raise DataError(f"no video stream in {src}")
        ist = inp.streams.video[0]
        in_rate = Fraction(ist.average_rate) if ist.average_rate else None
        with av.open(str(tmp), mode="w", format="mp4") as out:
            ost = None
            size = (0, 0)
            k = 0

            def emit(frame: Any) -> None:
                nonlocal ost, size, k
                if ost is None:
                    size = output_size(frame.width, frame.height, short_side)
                    ost = out.add_stream(codec, rate=rate)
                    ost.width, ost.height, ost.pix_fmt = size[0], size[1], "yuv420p"
                    if codec == "mpeg4":
                        ost.options = {"qmin": "2", "qmax": "8"}  # its default 200 kb/s blurs 224p frames
                vf = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
                vf.pts, vf.time_base = k, 1 / rate  # the input frame's own time base must not leak through
                for packet in ost.encode(vf):
                    out.mux(packet)
                k += 1

            prev, prev_t, start, last_dt = None, Fraction(0), None, None
            for i, frame in enumerate(inp.decode(ist)):
                t = _frame_time(frame, ist.time_base, i, in_rate)
                start = t if start is None else start
                t -= start
                if prev is not None:
                    while Fraction(k) / rate < t:  # output slots before this frame show the previous one
                        emit(prev)
                    if t > prev_t:
                        last_dt = t - prev_t
                prev, prev_t = frame, max(t, prev_t)
            if prev is None:
                raise DataError(f"video {src} has no decodable frames")
            # The last frame stays on screen for one frame interval.
            end = prev_t + (1 / in_rate if in_rate else last_dt or 1 / rate)
            while Fraction(k) / rate < end or k == 0:
                emit(prev)
            for packet in ost.encode():
                out.mux(packet)
    return {"frames": k, "width": size[0], "height": size[1], "fps": float(rate), "codec": codec}


def compress_video(
    src: str | os.PathLike, dst: str | os.PathLike, fps: float = 3, short_side: int = 224, codec: str | None = None
) -> dict[str, Any]:
    """Re-encode ``src`` to the mp4 ``dst`` at ``fps`` with short side ``short_side``; returns what was written.

    The codec is libx264 when PyAV has it, else mpeg4 (or ``codec``). Raises DataError for an unreadable input;
    ``dst`` is only created once the whole video is encoded.
    """
    av = import_av()
    src, dst = Path(src), Path(dst)
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if short_side < 2:
        raise ValueError(f"short_side must be at least 2, got {short_side}")
    if not src.is_file():
        raise DataError(f"video file not found: {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        info = _transcode(av, src, tmp, rate, short_side, _pick_codec(av, codec))
        os.replace(tmp, dst)
    except BaseException as e:  # includes KeyboardInterrupt: never leave the partial file behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, (av.FFmpegError, OSError, ValueError, IndexError, RuntimeError)) and not isinstance(
            e, DataError
        ):
            raise DataError(f"cannot compress {src}: {e}") from e
        raise
    return {"src": str(src), "dst": str(dst), **info}


def _job(src: Path, dst: Path, fps: float, short_side: int, codec: str | None) -> str | None:
    """Compress one file; the error message instead of an exception, so one bad file stops nothing."""
    try:
        compress_video(src, dst, fps, short_side, codec)
    except DataError as e:
        return str(e)
    except Exception as e:  # any failure of one file is reported, the run goes on
        return f"{type(e).__name__}: {e}"
    return None


def compress_videos(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fps: float = 3,
    short_side: int = 224,
    workers: int = 1,
    overwrite: bool = False,
    codec: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress every video under ``in_dir`` (recursively) to ``out_dir/<same relative path>.mp4``.

    Returns ``{"done": [...], "already_done": [...], "skipped": {file: reason}}`` with paths relative to
    ``in_dir``. Outputs that exist are kept unless ``overwrite``; unreadable inputs are skipped and reported.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise DataError(f"input folder not found: {in_dir}")
    if out_dir.resolve() == in_dir.resolve():
        raise DataError(f"the output folder must differ from the input folder ({in_dir})")
    out_resolved = out_dir.resolve()
    report: dict[str, Any] = {"done": [], "already_done": [], "skipped": {}}
    jobs: dict[str, tuple[Path, Path]] = {}

    def record(rel: str, error: str | None) -> None:
        if error is None:
            report["done"].append(rel)
        else:
            report["skipped"][rel] = error
        if progress is not None:
            progress(rel, error)

    owner: dict[Path, str] = {}
    for src in sorted(in_dir.rglob("*")):
        if src.name.startswith(".") or not is_video_file(src.name) or not src.is_file():
            continue
        if out_resolved in src.resolve().parents:
            continue  # outputs of an earlier run inside IN are not inputs
        rel = str(src.relative_to(in_dir))
        dst = out_dir / Path(rel).with_suffix(".mp4")
        if dst in owner:
            record(rel, f"same output file as {owner[dst]}")
            continue
        owner[dst] = rel
        if dst.exists() and not overwrite:
            report["already_done"].append(rel)
        else:
            jobs[rel] = (src, dst)

    if workers <= 1:
        for rel, (src, dst) in jobs.items():
            record(rel, _job(src, dst, fps, short_side, codec))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_job, src, dst, fps, short_side, codec): rel for rel, (src, dst) in jobs.items()}
            for fut in as_completed(futures):
                try:
                    error = fut.result()
                except BrokenProcessPool:
                    error = "a worker process died (crash in the decoder?)"
                record(futures[fut], error)
    report["done"].sort()
    report["skipped"] = dict(sorted(report["skipped"].items()))
    return report
