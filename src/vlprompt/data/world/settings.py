"""Scene settings: the context each super-category's scenes sit in (backdrop, context objects, layout).

COCO's super-categories differ in more than their objects: animals are photographed outdoors, kitchenware
indoors. The embedded world's continual and grounding scenes get the same kind of context, one setting per
super-category, so that a frozen image encoder can tell the tasks apart the way it can on COCO: a backdrop with
its own colour and texture (sky, meadow, wooden table, ruled paper, chalkboard, tiled wall), small context
objects painted into it (clouds, grass tufts and flowers, knots, ...), and a layout preference (objects high in
the sky, low on the grass). One scene in five sits in another super-category's setting (:data:`OFF_SETTING`), so
context is a strong cue but not a label, as in COCO. The base (pretraining) part and the other parts keep the
plain background.

A :class:`Backdrop` (setting name + seed) is part of a scene spec, so the same scene rendered in another domain
keeps the same backdrop; the shifted domains then treat it like the clean background (``textured`` and
``sketch`` replace it, the corruptions apply on top).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

SS = 4  # supersampling factor of render.py (kept equal there by an assertion)
BIG = 64 * SS
# Backdrops are painted on every STEP-th supersampled pixel (coordinates stay in supersampled units) and scaled
# up: four times cheaper, and no detail is thinner than STEP, so none falls between the samples.
STEP = 2
_N = BIG // STEP
_YY, _XX = (np.mgrid[0:BIG:STEP, 0:BIG:STEP]).astype(np.float32)


@dataclass(frozen=True)
class Layout:
    """Where a setting's objects go: weights of the three grid rows (single objects) and the vertical band
    (fractions of the free range, top = 0) that centres of groups, left/right pairs and grounding objects use."""

    rows: tuple[float, float, float] = (1.0, 1.0, 1.0)
    band: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Setting:
    """One super-category's scene context."""

    name: str
    supercategory: int
    layout: Layout


@dataclass(frozen=True)
class Backdrop:
    """The background of one scene: its setting and the seed of its random details."""

    setting: str
    seed: int


SETTINGS: tuple[Setting, ...] = (
    Setting("sky", 1, Layout((0.5, 0.35, 0.15), (0.0, 0.65))),
    Setting("meadow", 2, Layout((0.1, 0.35, 0.55), (0.4, 1.0))),
    Setting("wooden table", 3, Layout((0.25, 0.5, 0.25), (0.15, 0.85))),
    Setting("ruled paper", 4, Layout()),
    Setting("chalkboard", 5, Layout((0.4, 0.4, 0.2), (0.0, 0.8))),
    Setting("tiled wall", 6, Layout()),
)
SETTING_OF: dict[int, Setting] = {s.supercategory: s for s in SETTINGS}
_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


#: Probability that a scene sits in another super-category's setting, as COCO's objects sometimes appear out of
#: their usual context (a cat in a kitchen). Fixed a priori, not fitted to any method's results.
OFF_SETTING = 0.2


def setting_for(supercategory: int) -> Setting:
    """The setting of a super-category (1-based id)."""
    return SETTING_OF[supercategory]


def scene_setting(rng: random.Random, supercategory: int) -> Setting:
    """The setting of one scene of a super-category: its own, or with probability :data:`OFF_SETTING` another."""
    if rng.random() < OFF_SETTING:
        return rng.choice([s for s in SETTINGS if s.supercategory != supercategory])
    return SETTING_OF[supercategory]


# ---------------------------------------------------------------------------------------------------- painting


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    """A colour varied per image (brightness and a little per channel), so settings are distributions."""
    base = np.array(rgb, dtype=np.float32) * rng.uniform(1 - amount, 1 + amount)
    return base + rng.uniform(-12, 12, size=3).astype(np.float32)


def _vertical(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = (_YY / (BIG - 1))[..., None]
    return top * (1 - t) + bottom * t


def _blend(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    canvas[mask] = canvas[mask] * (1 - alpha) + colour * alpha


def _window(x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
    """Canvas slices (rows, cols) covering the box, clipped; context objects are painted in their own window
    (painting them on the full canvas made backdrops several times slower than the objects)."""
    ys = slice(max(0, math.floor(y0 / STEP)), min(_N, math.ceil(y1 / STEP) + 1))
    xs = slice(max(0, math.floor(x0 / STEP)), min(_N, math.ceil(x1 / STEP) + 1))
    return ys, xs


def _ellipses(canvas: np.ndarray, shapes: list[tuple[float, float, float, float]], colour: np.ndarray,
              alpha: float) -> None:  # fmt: skip
    """Blend the union of ellipses ``(cx, cy, rx, ry)`` once, in the window that holds them all."""
    ys, xs = _window(min(c[0] - c[2] for c in shapes), min(c[1] - c[3] for c in shapes),
                     max(c[0] + c[2] for c in shapes), max(c[1] + c[3] for c in shapes))  # fmt: skip
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    yy, xx = _YY[ys, xs], _XX[ys, xs]
    mask = np.zeros(yy.shape, dtype=bool)
    for cx, cy, rx, ry in shapes:
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    _blend(canvas[ys, xs], mask, colour, alpha)


def _sky(rng: np.random.Generator) -> np.ndarray:
    canvas = _vertical(_jitter(rng, (115, 165, 225), 0.08), _jitter(rng, (200, 222, 242), 0.04))
    white = np.array((250, 250, 252), dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):  # clouds: a few overlapping puffs
        cx, cy, r = rng.uniform(0, BIG), rng.uniform(0, 0.8 * BIG), rng.uniform(14, 26)
        puffs = [(cx + (k - 1) * r * 0.9, cy + rng.uniform(-4, 4), r, r * 0.6) for k in range(3)]
        _ellipses(canvas, puffs, white, 0.8)
    return canvas


def _meadow(rng: np.random.Generator) -> np.ndarray:
    horizon = rng.uniform(0.25, 0.4) * BIG
    grass = _jitter(rng, (105, 160, 75), 0.1)
    canvas = np.where((_YY < horizon)[..., None], _jitter(rng, (195, 222, 238), 0.04), grass)
    dark = grass * 0.7
    for _ in range(int(rng.integers(25, 45))):  # grass tufts: thin vertical blades below the horizon
        x, y, h = rng.uniform(0, BIG), rng.uniform(horizon + 8, BIG), rng.uniform(8, 18)
        ys, xs = _window(x - 1.5, y - h, x + 1.5, y)
        blade = (np.abs(_XX[ys, xs] - x) <= 1.5) & (_YY[ys, xs] <= y) & (_YY[ys, xs] >= y - h)
        _blend(canvas[ys, xs], blade, dark, 0.9)
    for _ in range(int(rng.integers(3, 8))):  # flowers: small light dots
        x, y = rng.uniform(0, BIG), rng.uniform(horizon + 8, BIG)
        colour = np.array((250, 245, 250) if rng.random() < 0.5 else (245, 190, 215), dtype=np.float32)
        _ellipses(canvas, [(x, y, 4, 4)], colour, 0.9)
    return canvas


def _table(rng: np.random.Generator) -> np.ndarray:
    wood = _jitter(rng, (185, 140, 95), 0.1)
    f, a, phase = rng.uniform(0.12, 0.2), rng.uniform(4, 10), rng.uniform(0, 2 * math.pi)
    grain = np.sin(_YY * f + a * np.sin(_XX * 0.02 + phase)) * 0.5 + 0.5
    canvas = wood[None, None, :] * (0.85 + 0.15 * grain[..., None])
    plank = rng.uniform(70, 100)
    offset = rng.uniform(0, plank)
    seams = ((_YY + offset) % plank) < 3
    _blend(canvas, seams, wood * 0.55, 0.9)
    for _ in range(int(rng.integers(1, 3))):  # knots
        x, y = rng.uniform(0, BIG), rng.uniform(0, BIG)
        _ellipses(canvas, [(x, y, rng.uniform(6, 10), rng.uniform(3, 5))], wood * 0.6, 0.8)
    return canvas


def _paper(rng: np.random.Generator) -> np.ndarray:
    canvas = np.broadcast_to(_jitter(rng, (246, 244, 232), 0.02), (_N, _N, 3)).copy()
    pitch, start = rng.uniform(28, 36), rng.uniform(8, 24)
    lines = ((_YY - start) % pitch) < 3
    _blend(canvas, lines, np.array((140, 175, 225), dtype=np.float32), 0.85)
    margin = rng.uniform(28, 44)
    _blend(canvas, np.abs(_XX - margin) < 2, np.array((225, 110, 110), dtype=np.float32), 0.85)
    return canvas


def _chalkboard(rng: np.random.Generator) -> np.ndarray:
    slate = _jitter(rng, (48, 78, 66), 0.12)
    canvas = np.broadcast_to(slate, (_N, _N, 3)).copy()
    chalk = np.array((225, 230, 225), dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):  # smudges of wiped chalk
        smudge = (rng.uniform(0, BIG), rng.uniform(0, BIG), rng.uniform(25, 60), rng.uniform(10, 25))
        _ellipses(canvas, [smudge], chalk, rng.uniform(0.06, 0.14))
    for _ in range(int(rng.integers(1, 4))):  # faint chalk strokes
        y0, slope = rng.uniform(0, BIG), rng.uniform(-0.3, 0.3)
        _blend(canvas, np.abs(_YY - (y0 + slope * _XX)) < 1.5, chalk, 0.35)
    return canvas


def _tiles(rng: np.random.Generator) -> np.ndarray:
    tile = _jitter(rng, (215, 212, 204), 0.06)
    size = int(rng.integers(10, 16)) * SS
    ox, oy = rng.integers(0, size, size=2)
    ix, iy = (_XX.astype(np.int64) + ox) // size, (_YY.astype(np.int64) + oy) // size
    shade = rng.uniform(0.92, 1.04, size=(int(iy.max()) + 1, int(ix.max()) + 1)).astype(np.float32)
    canvas = tile[None, None, :] * shade[iy, ix][..., None]
    grout = (((_XX.astype(np.int64) + ox) % size) < 3) | (((_YY.astype(np.int64) + oy) % size) < 3)
    _blend(canvas, grout, tile * 0.62, 1.0)
    return canvas


_PAINTERS = {"sky": _sky, "meadow": _meadow, "wooden table": _table, "ruled paper": _paper,
             "chalkboard": _chalkboard, "tiled wall": _tiles}  # fmt: skip
assert set(_PAINTERS) == set(_BY_NAME)


def paint_backdrop(backdrop: Backdrop) -> np.ndarray:
    """The supersampled background (``BIG x BIG x 3`` uint8) of a backdrop; a pure function of it."""
    if backdrop.setting not in _PAINTERS:
        raise ValueError(f"unknown setting {backdrop.setting!r}; expected one of {', '.join(_PAINTERS)}")
    rng = np.random.default_rng(backdrop.seed)
    small = np.clip(np.rint(_PAINTERS[backdrop.setting](rng)), 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(small, STEP, axis=0), STEP, axis=1)
