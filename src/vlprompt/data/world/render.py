"""Drawing scenes in each rendering domain: object masks with Pillow, fills and compositing in NumPy.

Objects are drawn at ``SS``x supersampling and box-filtered down to 64x64, which antialiases the edges.
Each domain is a deterministic function of (objects, seed): ``clean`` is the base style; ``sketch`` draws
jittered pencil strokes (outline plus hatching that keeps the fill readable) in a greyed version of the colour,
so colour words stay (weakly) true; ``noisy``, ``blurred`` and ``low_contrast`` corrupt the clean render, and
``textured`` draws the clean objects over a random textured background. A scene's backdrop (its setting, see
``settings.py``) replaces the plain background in the clean style and under the corruptions; ``sketch`` and
``textured`` replace it like they replace the plain one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.layout import DOMAINS
from vlprompt.data.world.scenes import CANVAS, ObjectSpec, SceneSpec
from vlprompt.data.world.settings import SS as _SETTINGS_SS
from vlprompt.data.world.settings import Backdrop, paint_backdrop

SS = 4  # supersampling factor
assert SS == _SETTINGS_SS, "settings.py paints backdrops at the same supersampling"
BIG = CANVAS * SS
BACKGROUND = np.array((245, 245, 242), dtype=np.uint8)
PAPER = np.array((238.0, 235.0, 226.0), dtype=np.float32)
PENCIL = np.array((60.0, 60.0, 60.0), dtype=np.float32)
EDGE = 6  # outline thickness in supersampled px (1.5 px at 64)
_YY, _XX = np.mgrid[0:BIG, 0:BIG]
_RGB = {k: np.array(v, dtype=np.float32) for k, v in V.COLOURS.items()}
_RGB8 = {k: np.array(v, dtype=np.uint8) for k, v in V.COLOURS.items()}
_TINT8 = {k: np.rint(0.3 * v + 0.7 * 255.0).astype(np.uint8) for k, v in _RGB.items()}


# ------------------------------------------------------------------------------------------------- object masks


def _regular(n: int, r: float, cx: float, cy: float, rot: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)
    ]


def _star(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 34, 0.45 - y / 34))
    return pts


@cache
def _glyph_master(char: str) -> np.ndarray:
    """The glyph drawn large and bold, cropped to its ink."""
    font = ImageFont.load_default(size=160)
    img = Image.new("L", (260, 260), 0)
    ImageDraw.Draw(img).text((40, 10), char, fill=255, font=font, stroke_width=4, stroke_fill=255)
    return np.asarray(img.crop(img.getbbox()))


@lru_cache(maxsize=4096)
def object_mask(category: str, box: int) -> np.ndarray:
    """Boolean mask (box x box) of the category's silhouette, inscribed in the box."""
    cat = V.CATEGORIES[V.CATEGORY_INDEX[category]]
    if cat.shape == "glyph":
        g = Image.fromarray(_glyph_master(cat.glyph))
        scale = box / max(g.size)
        w, h = max(1, round(g.width * scale)), max(1, round(g.height * scale))
        canvas = Image.new("L", (box, box), 0)
        canvas.paste(g.resize((w, h), Image.BILINEAR), ((box - w) // 2, (box - h) // 2))
        m = np.asarray(canvas) >= 128
        m.setflags(write=False)
        return m
    img = Image.new("L", (box, box), 0)
    d = ImageDraw.Draw(img)
    s = box - 1

    def P(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * s, y * s) for x, y in pts]

    shape = cat.shape
    if shape == "triangle":
        d.polygon(P([(0.5, 0.04), (0.98, 0.9), (0.02, 0.9)]), fill=255)
    elif shape == "square":
        d.rectangle(P([(0.08, 0.08), (0.92, 0.92)]), fill=255)
    elif shape == "pentagon":
        d.polygon(P(_regular(5, 0.5, 0.5, 0.55)), fill=255)
    elif shape == "hexagon":
        d.polygon(P(_regular(6, 0.5, 0.5, 0.5, rot=0.0)), fill=255)
    elif shape == "circle":
        d.ellipse(P([(0.03, 0.03), (0.97, 0.97)]), fill=255)
    elif shape == "oval":
        d.ellipse(P([(0.0, 0.2), (1.0, 0.8)]), fill=255)
    elif shape == "crescent":
        d.ellipse(P([(0.03, 0.03), (0.97, 0.97)]), fill=255)
        d.ellipse(P([(0.33, -0.05), (1.15, 0.8)]), fill=0)
    elif shape == "heart":
        d.polygon(P(_heart()), fill=255)
    elif shape == "plus":
        d.rectangle(P([(0.35, 0.02), (0.65, 0.98)]), fill=255)
        d.rectangle(P([(0.02, 0.35), (0.98, 0.65)]), fill=255)
    elif shape == "cross":
        w = 0.17
        for (x0, y0), (x1, y1) in (((0.08, 0.08), (0.92, 0.92)), ((0.92, 0.08), (0.08, 0.92))):
            dx, dy = (y1 - y0) * w / 1.19, (x0 - x1) * w / 1.19
            d.polygon(P([(x0 + dx, y0 + dy), (x1 + dx, y1 + dy), (x1 - dx, y1 - dy), (x0 - dx, y0 - dy)]), fill=255)
    elif shape == "arrow":
        d.rectangle(P([(0.02, 0.37), (0.56, 0.63)]), fill=255)
        d.polygon(P([(0.48, 0.1), (0.98, 0.5), (0.48, 0.9)]), fill=255)
    elif shape == "star":
        d.polygon(P(_star(0.5, 0.54, 0.52, 0.24)), fill=255)
    else:  # pragma: no cover - guarded by the vocabulary
        raise ValueError(f"unknown shape {shape!r}")
    m = np.asarray(img) >= 128
    m.setflags(write=False)
    return m


def _erode(m: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion with a (2r+1)^2 square, via an integral image (fast for any r)."""
    k = 2 * r + 1
    p = np.pad(m.astype(np.int32), r)
    ii = np.zeros((p.shape[0] + 1, p.shape[1] + 1), dtype=np.int32)
    ii[1:, 1:] = p.cumsum(0).cumsum(1)
    s = ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]
    return s == k * k


def _placed(obj: ObjectSpec) -> tuple[np.ndarray, slice, slice] | None:
    """The object's mask clipped to the canvas, with the canvas slices it covers."""
    box = max(4, round(obj.extent * SS))
    m = object_mask(obj.category, box)
    x0, y0 = round((obj.x - obj.extent / 2) * SS), round((obj.y - obj.extent / 2) * SS)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(BIG, x0 + box), min(BIG, y0 + box)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return m[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0], slice(cy0, cy1), slice(cx0, cx1)


def object_box(obj: ObjectSpec) -> tuple[float, float, float, float]:
    """The tight box ``(x, y, w, h)`` of the object's drawn pixels on the 64-px canvas (COCO's bbox convention),
    from the same mask and placement that :func:`render_objects` paints (clipped to the canvas)."""
    placed = _placed(obj)
    if placed is None or not placed[0].any():
        raise ValueError(f"object {obj} is not on the canvas")
    m, ys, xs = placed
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    x0, x1 = (xs.start + cols[0]) / SS, (xs.start + cols[-1] + 1) / SS
    y0, y1 = (ys.start + rows[0]) / SS, (ys.start + rows[-1] + 1) / SS
    return (x0, y0, x1 - x0, y1 - y0)


def _pattern(fill: str, ys: slice, xs: slice, sketch: bool = False) -> np.ndarray:
    yy, xx = _YY[ys, xs], _XX[ys, xs]
    if fill == "striped":
        return (yy % 16) < (6 if sketch else 8)
    if fill == "dotted":
        return ((yy % 20) - 10) ** 2 + ((xx % 20) - 10) ** 2 <= 25
    if fill == "solid" and sketch:  # cross-hatching stands in for a solid fill
        return ((xx + yy) % 14 < 3) | ((xx - yy) % 14 < 3)
    return np.zeros(yy.shape, dtype=bool)


def _paint_clean(canvas: np.ndarray, obj: ObjectSpec) -> None:
    placed = _placed(obj)
    if placed is None:
        return
    m, ys, xs = placed
    col = _RGB8[obj.colour]
    region = canvas[ys, xs]
    if obj.fill == "solid":
        region[m] = col
        return
    edge = m & ~_erode(m, EDGE)
    if obj.fill != "outline":
        region[m] = _TINT8[obj.colour]
        region[m & _pattern(obj.fill, ys, xs)] = col
    region[edge] = col


def _smooth_offsets(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    knots = rng.uniform(-amplitude, amplitude, size=6)
    return np.rint(np.interp(np.arange(n), np.linspace(0, n - 1, 6), knots)).astype(np.int64)


def _paint_sketch(canvas: np.ndarray, obj: ObjectSpec, rng: np.random.Generator) -> None:
    placed = _placed(obj)
    if placed is None:
        return
    m, ys, xs = placed
    pad = 10  # room for the jitter around the object's box
    wy = slice(max(0, ys.start - pad), min(BIG, ys.stop + pad))
    wx = slice(max(0, xs.start - pad), min(BIG, xs.stop + pad))
    h, w = wy.stop - wy.start, wx.stop - wx.start
    strokes = np.zeros((h, w), dtype=bool)
    strokes[ys.start - wy.start : ys.stop - wy.start, xs.start - wx.start : xs.stop - wx.start] = (
        m & ~_erode(m, 4)
    ) | (m & _pattern(obj.fill, ys, xs, sketch=True))
    pencil = 0.5 * _RGB[obj.colour] + 0.5 * PENCIL
    yy, xx = _YY[:h, :w], _XX[:h, :w]
    window = canvas[wy, wx]
    for alpha in (0.9, 0.45):  # a firm stroke and a lighter, offset, wobbly second pass
        dy, dx = rng.integers(-5, 6, size=2)
        rows = np.clip(yy + dy + _smooth_offsets(rng, w, 3)[None, :], 0, h - 1)
        cols = np.clip(xx + dx + _smooth_offsets(rng, h, 3)[:, None], 0, w - 1)
        ink = strokes[rows, cols][..., None] * np.float32(alpha)
        window *= 1 - ink
        window += ink * pencil


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A random textured background (BIG x BIG x 3 uint8): blotches, checks, stripes or speckles."""
    kind = int(rng.integers(4))
    c1, c2 = rng.integers(70, 236, size=(2, 3)).astype(np.uint8)
    if kind == 0:
        g = int(rng.integers(3, 7))
        small = rng.integers(70, 236, size=(g, g, 3)).astype(np.uint8)
        return np.array(Image.fromarray(small).resize((BIG, BIG), Image.BICUBIC))
    period = int(rng.integers(5, 12)) * SS
    if kind == 1:
        sel = ((_YY // (period // 2)) + (_XX // (period // 2))) % 2 == 0
    elif kind == 2:
        sel = ((_XX + _YY * int(rng.choice([-1, 1]))) % period) < period // 2
    else:
        sel = np.zeros((BIG, BIG), dtype=bool)
        n = int(rng.integers(40, 90))
        cy, cx = rng.integers(0, BIG, size=(2, n))
        r = rng.integers(4, 12, size=n)
        for y, x, rr in zip(cy, cx, r):
            y0, y1, x0, x1 = max(0, y - rr), min(BIG, y + rr), max(0, x - rr), min(BIG, x + rr)
            sel[y0:y1, x0:x1] |= (_YY[y0:y1, x0:x1] - y) ** 2 + (_XX[y0:y1, x0:x1] - x) ** 2 <= rr * rr
    return np.where(sel[..., None], c1, c2)


def _muted(texture: np.ndarray) -> np.ndarray:
    # Pull textures a third of the way to light grey so object colours stay nameable on them.
    return (texture.astype(np.uint16) * 2 // 3 + 70).astype(np.uint8)


def _downsample(canvas: np.ndarray) -> np.ndarray:
    """Box-filter the supersampled uint8 canvas down to 64x64 (uint8)."""
    return np.asarray(Image.fromarray(canvas).reduce(SS))


def render_objects(
    objects: Sequence[ObjectSpec], domain: str = "clean", seed: int = 0, backdrop: Backdrop | None = None
) -> np.ndarray:
    """Render objects (drawn in order) in a domain, on a backdrop or the plain background; 64x64x3 uint8."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    rng = np.random.default_rng(seed)
    if domain == "sketch":
        canvas = np.broadcast_to(PAPER, (BIG, BIG, 3)).copy()
        for obj in objects:
            _paint_sketch(canvas, obj, rng)
        small = _downsample(np.rint(canvas).astype(np.uint8)) + rng.normal(0.0, 3.0, size=(CANVAS, CANVAS, 1))
        return np.clip(np.rint(small), 0, 255).astype(np.uint8)
    if domain == "textured":
        canvas = _muted(_texture(rng))
    elif backdrop is not None:
        canvas = paint_backdrop(backdrop)
    else:
        canvas = np.broadcast_to(BACKGROUND, (BIG, BIG, 3)).copy()
    for obj in objects:
        _paint_clean(canvas, obj)
    out = _downsample(canvas)
    if domain == "noisy":
        out = np.clip(np.rint(out + rng.normal(0.0, 32.0, size=out.shape)), 0, 255).astype(np.uint8)
    elif domain == "low_contrast":
        grey = rng.uniform(110, 160)
        out = np.clip(np.rint(grey + (out - grey) * 0.3), 0, 255).astype(np.uint8)
    elif domain == "blurred":
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=1.4)))
    return out


def render_scene(scene: SceneSpec, domain: str = "clean", seed: int = 0) -> np.ndarray:
    """Render a scene spec in a domain (64x64x3 uint8); the seed drives only the domain's randomness."""
    return render_objects(scene.objects, domain, seed, scene.backdrop)
