"""Short order-sensitive videos: event specs, their time reversal, captions, frames and mp4 writing (PyAV).

A video shows one object and one or two steps (move, grow/shrink, recolour, appear/disappear). The reversed
video is the same frames backwards; its caption comes from the inverted spec ("a blue star turns red" for
"a red star turns blue"), so frame mean-pooling cannot tell the pair apart but frame order can.
Step j of K occupies frames [j*T/K, (j+1)*T/K) and its progress runs 0 -> 1 linearly across them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.layout import VIDEO_FPS, VIDEO_FRAMES
from vlprompt.data.world.render import render_objects
from vlprompt.data.world.scenes import CANVAS, MARGIN, ObjectSpec, _pick, distinct_captions, object_phrase

EXTENT = {"small": 12.0, "large": 22.0}
STEP_KINDS = ("move", "size", "recolour", "visibility")
STEP_WEIGHTS = (0.4, 0.2, 0.25, 0.15)
_DELTA = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Step:
    """One event step: kind in move/grow/shrink/recolour/appear/disappear; value = direction or new colour."""

    kind: str
    value: str = ""


@dataclass(frozen=True)
class VideoSpec:
    """An object in its initial state (visible unless the first step is 'appear') and its steps."""

    obj: ObjectSpec
    steps: tuple[Step, ...]
    distance: float  # pixels per move step


def _invert(step: Step, before: ObjectSpec) -> Step:
    if step.kind == "move":
        return Step("move", V.OPPOSITE_DIRECTION[step.value])
    if step.kind == "recolour":
        return Step("recolour", before.colour)
    return Step({"grow": "shrink", "shrink": "grow", "appear": "disappear", "disappear": "appear"}[step.kind])


def _apply(obj: ObjectSpec, step: Step, p: float, distance: float) -> ObjectSpec:
    """The object after ``step`` has progressed by p in [0, 1]."""
    if step.kind == "move":
        dx, dy = _DELTA[step.value]
        return replace(obj, x=obj.x + dx * distance * p, y=obj.y + dy * distance * p)
    if step.kind in ("grow", "shrink"):
        a, b = (EXTENT["small"], EXTENT["large"]) if step.kind == "grow" else (EXTENT["large"], EXTENT["small"])
        size = obj.size if p < 0.5 else ("large" if step.kind == "grow" else "small")
        return replace(obj, extent=a + (b - a) * p, size=size)
    if step.kind == "recolour":
        return obj if p < 0.5 else replace(obj, colour=step.value)
    return obj  # appear/disappear change visibility only


def _states(spec: VideoSpec) -> list[ObjectSpec | None]:
    """The object (or None when hidden) in every frame."""
    k = len(spec.steps)
    seg = VIDEO_FRAMES // k
    out: list[ObjectSpec | None] = []
    for f in range(VIDEO_FRAMES):
        obj, visible = spec.obj, spec.steps[0].kind != "appear"
        for j, step in enumerate(spec.steps):
            p = min(1.0, max(0.0, (f - j * seg) / (seg - 1)))
            obj = _apply(obj, step, p, spec.distance)
            if step.kind == "appear":
                visible = p >= 0.5
            elif step.kind == "disappear" and p >= 0.5:
                visible = False
        out.append(obj if visible else None)
    return out


def final_object(spec: VideoSpec) -> ObjectSpec:
    """The object's state after every step completes."""
    obj = spec.obj
    for step in spec.steps:
        obj = _apply(obj, step, 1.0, spec.distance)
    return obj


def reverse_video(spec: VideoSpec) -> VideoSpec:
    """The spec of the time-reversed video: final state first, inverted steps in reverse order."""
    befores, obj = [], spec.obj
    for step in spec.steps:
        befores.append(obj)
        obj = _apply(obj, step, 1.0, spec.distance)
    steps = tuple(_invert(s, b) for s, b in zip(reversed(spec.steps), reversed(befores)))
    return VideoSpec(obj, steps, spec.distance)


def sample_video(rng: random.Random, categories: Sequence[str] | None = None) -> VideoSpec:
    """A random non-palindromic event (its reversal has a different caption)."""
    categories = categories or [c.name for c in V.CATEGORIES]
    while True:
        spec = _try_sample(rng, categories)
        if spec is not None and caption_for_video(reverse_video(spec)) != caption_for_video(spec):
            return spec


def _try_sample(rng: random.Random, categories: Sequence[str]) -> VideoSpec | None:
    n = 1 if rng.random() < 0.5 else 2
    colour = rng.choice(V.COLOUR_NAMES)
    cur, steps, size = colour, [], rng.choice(V.SIZES)
    for j in range(n):
        kind = rng.choices(STEP_KINDS, STEP_WEIGHTS)[0]
        if kind == "move":
            d = rng.choice(tuple(_DELTA))
            if any(s.kind == "move" and s.value in (d, V.OPPOSITE_DIRECTION[d]) for s in steps):
                return None
            steps.append(Step("move", d))
        elif kind == "size":
            if any(s.kind in ("grow", "shrink") for s in steps):
                return None
            grow = rng.random() < 0.5
            size = "small" if grow else "large"
            steps.append(Step("grow" if grow else "shrink"))
        elif kind == "recolour":
            cur = rng.choice([c for c in V.COLOUR_NAMES if c != cur])
            steps.append(Step("recolour", cur))
        else:  # an object can only appear first and disappear last
            if j == 0 and (n == 1 and rng.random() < 0.5 or n == 2):
                steps.append(Step("appear"))
            elif j == n - 1:
                steps.append(Step("disappear"))
            else:  # pragma: no cover - unreachable with n <= 2
                return None
    distance = 28.0 if n == 1 else 20.0
    big = EXTENT["large"] if size == "large" or any(s.kind in ("grow", "shrink") for s in steps) else EXTENT[size]
    lo, hi = MARGIN + big / 2, CANVAS - MARGIN - big / 2
    # Place the start so the whole trajectory stays inside [lo, hi] on both axes.
    xs, ys, x, y = [0.0], [0.0], 0.0, 0.0
    for s in steps:
        if s.kind == "move":
            x, y = x + _DELTA[s.value][0] * distance, y + _DELTA[s.value][1] * distance
            xs.append(x)
            ys.append(y)
    x0 = rng.uniform(lo - min(xs), hi - max(xs))
    y0 = rng.uniform(lo - min(ys), hi - max(ys))
    cat = rng.choice(list(categories))
    fill = rng.choice(V.CATEGORIES[V.CATEGORY_INDEX[cat]].fills)
    obj = ObjectSpec(cat, colour, size, fill, round(x0, 2), round(y0, 2), EXTENT[size])
    return VideoSpec(obj, tuple(steps), distance)


# ----------------------------------------------------------------------------------------------------- captions


def _verb(step: Step, rng: random.Random | None) -> str:
    if step.kind == "move":
        return _pick(V.MOVE_WORDS[step.value], rng)
    if step.kind == "recolour":
        return _pick(V.RECOLOUR_WORDS, rng).format(step.value)
    words = {"grow": V.GROW_WORDS, "shrink": V.SHRINK_WORDS, "appear": V.APPEAR_WORDS, "disappear": V.DISAPPEAR_WORDS}
    return _pick(words[step.kind], rng)


def _video_caption(spec: VideoSpec, rng: random.Random | None) -> str:
    resizes = any(s.kind in ("grow", "shrink") for s in spec.steps)
    if rng is None:
        obj = object_phrase(spec.obj, None, size=not resizes, fill=True)
    else:
        obj = object_phrase(spec.obj, rng, size=not resizes and rng.random() < 0.6, fill=rng.random() < 0.5,
                            fill_suffix=rng.random() < 0.3)  # fmt: skip
    verbs = [_verb(s, rng) for s in spec.steps]
    if len(verbs) == 1:
        options = ("{o} {v0}", "in this clip {o} {v0}", "a video of {o} that {v0}", "we see {o} that {v0}")
    else:
        options = ("{o} {v0} then {v1}", "{o} {v0} and then {v1}", "first {o} {v0}, then it {v1}",
                   "{o} {v0}, after that it {v1}", "a video of {o} that {v0} and then {v1}")  # fmt: skip
    template = options[0] if rng is None else rng.choice(options)
    return template.format(o=obj, v0=verbs[0], v1=verbs[-1])


def caption_for_video(spec: VideoSpec) -> str:
    """The canonical caption: all static attributes (size omitted when it changes), first synonyms."""
    return _video_caption(spec, None)


def captions_for_video(spec: VideoSpec, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct captions, the canonical one first."""
    return distinct_captions(lambda r: _video_caption(spec, r), rng, n)


# ------------------------------------------------------------------------------------------------------- frames


def render_video(spec: VideoSpec, reverse: bool = False) -> list[np.ndarray]:
    """The clean-domain frames (T x 64x64x3 uint8); ``reverse`` gives the exact time reversal."""
    frames = [render_objects([] if o is None else [o], "clean", 0) for o in _states(spec)]
    return frames[::-1] if reverse else frames


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 in PyAV's packed layout ((h * 3 / 2) x w): Y rows, then U, then V."""
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), sub(u).reshape(-1), sub(v).reshape(-1)]
    packed = np.concatenate(planes).reshape(h * 3 // 2, w)
    return np.clip(np.rint(packed), 0, 255).astype(np.uint8)


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """Write frames as an MPEG-4 Part 2 mp4 at constant quantiser 2, byte-deterministic.

    Why not H.264: the libx264 in PyAV's wheel gave different bytes for the same frames in about 1% of runs even
    with one thread; the mpeg4 encoder never did (6 x 580 videos). The RGB -> YUV conversion is done here in
    NumPy so no swscale state is involved either, and the mp4 muxer writes no creation time unless asked to.
    """
    import av  # optional dependency: only the video part needs it

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"qmin": "2", "qmax": "2"}
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            vf.pts = i
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
