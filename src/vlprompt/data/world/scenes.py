"""Scene specs (what is in a static image), their seeded sampling, and the captions that describe them.

A scene is one of three kinds: a ``single`` object at a named grid position, a ``group`` of 2-3 identical
objects, or a ``pair`` of two different objects in a spatial relation (the grounding part's scenes of 2-4 objects,
kind ``grounding``, come from ``refexp.py``). Coordinates are in pixels of the
64x64 canvas; every object keeps ``MARGIN`` pixels from the border so crops down to ~52 px keep it whole.
Captions always name the colour and category of every object (so they are truthful and discriminative);
size, fill and position are mentioned in most but not all varied captions, like real captions. A scene sampled
with a :class:`~vlprompt.data.world.settings.Setting` follows its layout and carries its backdrop (the continual
sequence's scenes); without one it sits on the plain background (the base and every other part).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.settings import Backdrop, Layout, Setting

CANVAS = 64
MARGIN = 6.0
GRID = (19.0, 32.0, 45.0)  # grid cell centres for single objects
EXTENT = {  # bounding-box side in px, per scene kind and size word
    "single": {"small": 15.0, "large": 25.0},
    "group": {"small": 12.0, "large": 18.0},
    "pair": {"small": 13.0, "large": 21.0},
}
KINDS = ("single", "group", "pair")
KIND_WEIGHTS = (0.35, 0.25, 0.40)

ColourRule = Callable[[str], Sequence[str]]  # category name -> colours it may take


@dataclass(frozen=True)
class ObjectSpec:
    """One drawn object: what it is and where (centre and box side in 64-px canvas pixels)."""

    category: str
    colour: str
    size: str  # "small" | "large"
    fill: str  # "solid" | "striped" | "dotted" | "outline"
    x: float
    y: float
    extent: float


@dataclass(frozen=True)
class SceneSpec:
    """A static scene. ``position`` is set for single objects, ``relation`` (objects[0] REL objects[1]) for pairs;
    ``backdrop`` is None for the plain background."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    position: str | None = None
    relation: str | None = None
    backdrop: Backdrop | None = None

    @property
    def count(self) -> int:
        """Number of drawn objects."""
        return len(self.objects)


def all_colours(category: str) -> Sequence[str]:
    """Every colour is allowed."""
    return V.COLOUR_NAMES


def base_colours(category: str) -> Sequence[str]:
    """Colours allowed in the base (pretraining) part: the held-out pairs are removed."""
    return [c for c in V.COLOUR_NAMES if (category, c) not in V.HELD_OUT_BASE]


def _jitter(rng: random.Random, v: float, amount: float) -> float:
    return round(v + rng.uniform(-amount, amount), 2)


def _object(rng: random.Random, category: str, colour: str, kind: str, x: float = 0.0, y: float = 0.0) -> ObjectSpec:
    size = rng.choice(V.SIZES)
    fill = rng.choice(V.CATEGORIES[V.CATEGORY_INDEX[category]].fills)
    return ObjectSpec(category, colour, size, fill, x, y, _jitter(rng, EXTENT[kind][size], 1.0))


def _pick_pair(
    rng: random.Random, categories: Sequence[str], colours_for: ColourRule, forced: tuple[str, str] | None
) -> tuple[str, str]:
    if forced is not None:
        return forced
    cat = rng.choice(list(categories))
    return cat, rng.choice(list(colours_for(cat)))


def sample_scene(
    rng: random.Random,
    categories: Sequence[str] | None = None,
    colours_for: ColourRule = all_colours,
    first: tuple[str, str] | None = None,
    kind: str | None = None,
    setting: Setting | None = None,
) -> SceneSpec:
    """Sample a scene; ``first`` forces the (category, colour) of the first object; ``setting`` places the objects
    by its layout and gives the scene its backdrop (without one the draws are exactly those of the plain world)."""
    categories = categories or [c.name for c in V.CATEGORIES]
    kind = kind or rng.choices(KINDS, KIND_WEIGHTS)[0]
    cat, col = _pick_pair(rng, categories, colours_for, first)
    layout = setting.layout if setting is not None else None
    if kind == "single":
        scene = _place_single(rng, _object(rng, cat, col, "single"), layout)
    elif kind == "group":
        scene = _place_group(rng, _object(rng, cat, col, "group"), rng.choice((2, 3)), layout)
    else:
        a = _object(rng, cat, col, "pair")
        while True:
            cat_b, col_b = _pick_pair(rng, categories, colours_for, None)
            if (cat_b, col_b) != (cat, col):
                break
        scene = _place_pair(rng, a, _object(rng, cat_b, col_b, "pair"), rng.choice(V.RELATIONS), layout)
    if setting is None:
        return scene
    return replace(scene, backdrop=Backdrop(setting.name, rng.getrandbits(63)))


def sample_class_scene(rng: random.Random, category: str, colour: str) -> SceneSpec:
    """A single object of a given category and colour (a classification image)."""
    return _place_single(rng, _object(rng, category, colour, "single"))


def band_range(lo: float, hi: float, layout: Layout | None) -> tuple[float, float]:
    """The part of ``[lo, hi]`` (a free range of centre coordinates) that a layout's vertical band allows."""
    if layout is None:
        return lo, hi
    return lo + layout.band[0] * (hi - lo), lo + layout.band[1] * (hi - lo)


def _place_single(rng: random.Random, obj: ObjectSpec, layout: Layout | None = None) -> SceneSpec:
    # randrange keeps the plain world's draws; a layout weights the rows instead
    row = rng.randrange(3) if layout is None else rng.choices(range(3), layout.rows)[0]
    col = rng.randrange(3)
    obj = replace(obj, x=_jitter(rng, GRID[col], 1.5), y=_jitter(rng, GRID[row], 1.5))
    return SceneSpec("single", (obj,), position=V.POSITION_NAMES[(row, col)])


def _place_group(rng: random.Random, obj: ObjectSpec, count: int, layout: Layout | None = None) -> SceneSpec:
    lo, hi = MARGIN + obj.extent / 2, CANVAS - MARGIN - obj.extent / 2
    ylo, yhi = band_range(lo, hi, layout)
    centres: list[tuple[float, float]] = []
    for _ in range(500):
        p = (round(rng.uniform(lo, hi), 2), round(rng.uniform(ylo, yhi), 2))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= (obj.extent + 3) ** 2 for q in centres):
            centres.append(p)
            if len(centres) == count:
                break
    else:  # pragma: no cover - the canvas always has room, but never loop forever
        centres = [(lo + i * (hi - lo) / max(1, count - 1), (lo + hi) / 2) for i in range(count)]
    return SceneSpec("group", tuple(replace(obj, x=x, y=y) for x, y in centres))


def _place_pair(
    rng: random.Random, a: ObjectSpec, b: ObjectSpec, relation: str, layout: Layout | None = None
) -> SceneSpec:
    # Lay out along x for left/right (along y for above/below, then swap axes): first/second = lower/higher coord.
    first, second = (a, b) if relation in ("left of", "above") else (b, a)
    gap = (first.extent + second.extent) / 2 + 4
    while True:
        u = rng.uniform(MARGIN + first.extent / 2, CANVAS / 2 - 2)
        v = rng.uniform(CANVAS / 2 + 2, CANVAS - MARGIN - second.extent / 2)
        if v - u >= gap:
            break
    big = max(a.extent, b.extent)
    # a layout's band applies to the cross axis of left/right pairs (above/below pairs need the whole height)
    w_lo, w_hi = MARGIN + big / 2 + 2, CANVAS - MARGIN - big / 2 - 2
    w0 = rng.uniform(*(band_range(w_lo, w_hi, layout) if relation in ("left of", "right of") else (w_lo, w_hi)))
    w1, w2 = round(w0 + rng.uniform(-2, 2), 2), round(w0 + rng.uniform(-2, 2), 2)
    u, v = round(u, 2), round(v, 2)
    if relation in ("left of", "right of"):
        first, second = replace(first, x=u, y=w1), replace(second, x=v, y=w2)
    else:
        first, second = replace(first, x=w1, y=u), replace(second, x=w2, y=v)
    a, b = (first, second) if relation in ("left of", "above") else (second, first)
    return SceneSpec("pair", (a, b), relation=relation)


# ----------------------------------------------------------------------------------------------------- captions


def _pick(options: Sequence[str], rng: random.Random | None) -> str:
    return options[0] if rng is None else rng.choice(list(options))


def category_words(category: str) -> tuple[str, ...]:
    """Every noun (singular and plural) that may name the category in a caption."""
    c = V.CATEGORIES[V.CATEGORY_INDEX[category]]
    return c.singular + c.plural


def object_phrase(
    obj: ObjectSpec,
    rng: random.Random | None = None,
    count: int = 1,
    size: bool = True,
    fill: bool = True,
    fill_suffix: bool = False,
) -> str:
    """'a large striped red star', 'two small red stars with dots', ... (no fill word for glyphs)."""
    cat = V.CATEGORIES[V.CATEGORY_INDEX[obj.category]]
    fill = fill and cat.has_fill
    words = []
    if size:
        words.append(_pick(V.SIZE_WORDS[obj.size], rng))
    if fill and not fill_suffix:
        words.append(_pick(V.FILL_WORDS[obj.fill], rng))
    words += [obj.colour, _pick(cat.singular if count == 1 else cat.plural, rng)]
    phrase = " ".join(words)
    if fill and fill_suffix:
        phrase += " " + _pick(V.FILL_SUFFIX[obj.fill], rng)
    det = V.article(phrase) if count == 1 else _pick(V.COUNT_WORDS[count], rng)
    return f"{det} {phrase}"


def caption_for(scene: SceneSpec) -> str:
    """The canonical caption: every attribute, first synonyms, no template (deterministic)."""
    return _caption(scene, None)


def captions_for(scene: SceneSpec, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct captions: the canonical one first, then varied templates and synonyms."""
    return distinct_captions(lambda r: _caption(scene, r), rng, n)


def distinct_captions(make: Callable[[random.Random | None], str], rng: random.Random, n: int) -> list[str]:
    """``make(None)`` (the canonical caption) and then ``n - 1`` different draws of ``make(rng)``."""
    caps = [make(None)]
    for _ in range(20 * n):
        if len(caps) == n:
            break
        c = make(rng)
        if c not in caps:
            caps.append(c)
    while len(caps) < n:  # pragma: no cover - only with tiny vocabularies
        caps.append(caps[-1])
    return caps


def _caption(scene: SceneSpec, rng: random.Random | None) -> str:
    def flags() -> dict:
        if rng is None:
            return {"size": True, "fill": True, "fill_suffix": False}
        return {"size": rng.random() < 0.75, "fill": rng.random() < 0.6, "fill_suffix": rng.random() < 0.3}

    def template(options: Sequence[str], body: str) -> str:
        return body if rng is None else rng.choice(list(options)).format(body)

    if scene.kind == "single":
        body = object_phrase(scene.objects[0], rng, **flags())
        if rng is None or rng.random() < 0.75:
            body += " " + _pick(V.POSITION_WORDS[scene.position], rng)
        return template(("{}", "there is {}", "a picture of {}", "an image showing {}", "a drawing of {}"), body)
    if scene.kind == "group":
        body = object_phrase(scene.objects[0], rng, count=scene.count, **flags())
        return template(("{}", "there are {}", "a picture of {}", "an image showing {}", "a drawing of {}"), body)
    a, b = scene.objects
    rel = scene.relation
    if rng is not None and rng.random() < 0.5:  # say it the other way round
        a, b, rel = b, a, V.INVERSE_RELATION[rel]
    pa, pb = object_phrase(a, rng, **flags()), object_phrase(b, rng, **flags())
    rel_words = _pick(V.RELATION_WORDS[rel], rng)
    if rng is not None and rng.random() < 0.25:
        same = a.category == b.category
        ra = f"{a.colour} {_pick(category_words(a.category)[:1], rng)}" if same else _pick((a.category,), rng)
        rb = f"{b.colour} {_pick(category_words(b.category)[:1], rng)}" if same else _pick((b.category,), rng)
        return f"{pa} and {pb}, the {ra} is {rel_words} the {rb}"
    return template(("{}", "there is {}", "a picture of {}", "a drawing of {}"), f"{pa} {rel_words} {pb}")
