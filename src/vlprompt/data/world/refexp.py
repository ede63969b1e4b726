"""Referring expressions for the embedded world's grounding part: scenes of 2-4 objects and, per target, an
expression that picks it out uniquely.

An :class:`Expression` is structured (a :class:`Description` of the target by category and optionally colour,
size and fill; optionally the *extreme* one of those in a direction, or those in a spatial *relation* to a
uniquely described landmark); :func:`resolve` evaluates it on a scene, and an expression is only ever emitted
when it resolves to exactly its target. The words come from the world's vocabulary ("the small red star left of
the blue circle", "the digit 3 on the left", "the striped square"). Relations and extremes hold with margins
(:data:`RELATION_GAP`, :data:`EXTREME_GAP` pixels) so that no expression rests on a pixel-level judgement.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import combinations

from vlprompt.data.world import vocabulary as V
from vlprompt.data.world.scenes import CANVAS, MARGIN, ColourRule, ObjectSpec, SceneSpec, band_range
from vlprompt.data.world.settings import Backdrop, Setting

EXTENT = {"small": 12.0, "large": 18.0}  # box side per size word; the two never overlap after jitter
OBJECT_GAP = 2.0  # px between the nominal boxes of two objects of a scene
RELATION_GAP = 1.0  # "A left of B": A's nominal box ends at least this far left of B's
EXTREME_GAP = 4.0  # "the A on the left": its centre at least this far left of every other A's
COUNTS = (2, 3, 4)
SAME_CATEGORY = 0.3  # probability that a further object repeats an earlier category in another colour
SAME_LOOK = 0.15  # ... or repeats an earlier category and colour (then only size, fill or place tell them apart)
FORM_WEIGHTS = {"plain": 0.4, "extreme": 0.25, "relation": 0.35}
DIRECTIONS = ("left", "right", "top", "bottom")
# Only words of the world's captions: the shipped tiny CLIPs have no embedding for any other ("leftmost").
EXTREME_WORDS = {
    "left": ("the {} on the left", "the left {}"),
    "right": ("the {} on the right", "the right {}"),
    "top": ("the {} at the top", "the top {}"),
    "bottom": ("the {} at the bottom", "the bottom {}"),
}


@dataclass(frozen=True)
class Description:
    """The objects of a category that also have every attribute given (None = not said)."""

    category: str
    colour: str | None = None
    size: str | None = None
    fill: str | None = None

    def matches(self, obj: ObjectSpec) -> bool:
        """Whether ``obj`` fits the description."""
        # spelled out rather than looped: generating the world's expressions calls this a few million times
        return (
            obj.category == self.category
            and (self.colour is None or self.colour == obj.colour)
            and (self.size is None or self.size == obj.size)
            and (self.fill is None or self.fill == obj.fill)
        )

    @property
    def detail(self) -> int:
        """How many attributes besides the category it names."""
        return (self.colour is not None) + (self.size is not None) + (self.fill is not None)


@dataclass(frozen=True)
class Expression:
    """A referring expression: the target's description, refined by an ``extreme`` direction or by a
    ``relation`` to a ``landmark`` (never both)."""

    target: Description
    extreme: str | None = None
    relation: str | None = None
    landmark: Description | None = None

    def __post_init__(self) -> None:
        if self.extreme is not None and self.relation is not None:
            raise ValueError("an expression uses an extreme or a relation, not both")
        if (self.relation is None) != (self.landmark is None):
            raise ValueError("a relation needs a landmark and a landmark a relation")


# --------------------------------------------------------------------------------------------------- semantics


def holds(relation: str, a: ObjectSpec, b: ObjectSpec) -> bool:
    """Whether ``a`` is ``relation`` ``b``, judged on the nominal boxes (which contain the drawn pixels)."""
    if relation == "left of":
        return a.x + a.extent / 2 + RELATION_GAP <= b.x - b.extent / 2
    if relation == "right of":
        return holds("left of", b, a)
    if relation == "above":
        return a.y + a.extent / 2 + RELATION_GAP <= b.y - b.extent / 2
    if relation == "below":
        return holds("above", b, a)
    raise ValueError(f"unknown relation {relation!r}; expected one of {V.RELATIONS}")


def extreme_of(direction: str, objects: Sequence[ObjectSpec], indices: Sequence[int]) -> int | None:
    """The index (among ``indices``) of the object clearly furthest in ``direction``, or None if none is clear."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    if len(indices) < 2:
        return None
    sign = -1.0 if direction in ("left", "top") else 1.0
    axis = "x" if direction in ("left", "right") else "y"
    ranked = sorted(indices, key=lambda i: -sign * getattr(objects[i], axis))
    first, second = (sign * getattr(objects[i], axis) for i in ranked[:2])
    return ranked[0] if first - second >= EXTREME_GAP else None


def resolve(expr: Expression, objects: Sequence[ObjectSpec]) -> list[int]:
    """Indices of the objects the expression picks out (a valid referring expression gives exactly one)."""
    found = [i for i, o in enumerate(objects) if expr.target.matches(o)]
    if expr.extreme is not None:
        best = extreme_of(expr.extreme, objects, found)
        return [] if best is None else [best]
    if expr.relation is not None:
        marks = [j for j, o in enumerate(objects) if expr.landmark.matches(o)]
        if len(marks) != 1:  # the landmark must itself be unambiguous
            return []
        found = [i for i in found if i != marks[0] and holds(expr.relation, objects[i], objects[marks[0]])]
    return found


# ------------------------------------------------------------------------------------------------- generation


def _descriptions(obj: ObjectSpec) -> list[Description]:
    """Every description of ``obj``: its category with each subset of its colour, size and (if shown) fill."""
    attrs = ["colour", "size"] + (["fill"] if V.CATEGORIES[V.CATEGORY_INDEX[obj.category]].has_fill else [])
    out = []
    for k in range(len(attrs) + 1):
        for subset in combinations(attrs, k):
            out.append(Description(obj.category, **{a: getattr(obj, a) for a in subset}))
    return out


def landmarks(objects: Sequence[ObjectSpec]) -> list[list[Description]]:
    """Per object, its briefest descriptions that name it uniquely (empty when none does): how people name a
    landmark ("left of the circle" when there is one circle)."""
    out = []
    for j, obj in enumerate(objects):
        unique = [d for d in _descriptions(obj) if resolve(Expression(d), objects) == [j]]
        out.append([d for d in unique if d.detail == min(u.detail for u in unique)])
    return out


def candidates(
    objects: Sequence[ObjectSpec], target: int, marks: list[list[Description]] | None = None
) -> dict[str, list[Expression]]:
    """Every expression of each form that resolves to exactly ``target`` (deterministic order). Relations use
    the landmarks' briefest names (``marks``, from :func:`landmarks`) and at most one attribute of the target."""
    marks = landmarks(objects) if marks is None else marks
    found: dict[str, list[Expression]] = {"plain": [], "extreme": [], "relation": []}
    descriptions = _descriptions(objects[target])
    for d in descriptions:
        if resolve(Expression(d), objects) == [target]:
            found["plain"].append(Expression(d))
        elif sum(d.matches(o) for o in objects) >= 2:
            found["extreme"] += [e for e in (Expression(d, extreme=k) for k in DIRECTIONS)
                                 if resolve(e, objects) == [target]]  # fmt: skip
    for j in range(len(objects)):
        if j == target:
            continue
        for d in (d for d in descriptions if d.detail <= 1):
            for rel in V.RELATIONS:
                found["relation"] += [e for e in (Expression(d, relation=rel, landmark=m) for m in marks[j])
                                      if resolve(e, objects) == [target]]  # fmt: skip
    return found


def choose_expression(
    objects: Sequence[ObjectSpec], target: int, rng: random.Random, marks: list[list[Description]] | None = None
) -> Expression | None:
    """A random unique expression of the target (form by :data:`FORM_WEIGHTS`), or None when it has none."""
    found = {k: v for k, v in candidates(objects, target, marks).items() if v}
    if not found:
        return None
    forms = list(found)
    form = rng.choices(forms, [FORM_WEIGHTS[f] for f in forms])[0]
    return rng.choice(found[form])


def _phrase(d: Description, rng: random.Random) -> str:
    words = [rng.choice(V.SIZE_WORDS[d.size])] if d.size else []
    words += [rng.choice(V.FILL_WORDS[d.fill])] if d.fill else []
    words += [d.colour] if d.colour else []
    words.append(rng.choice(V.CATEGORIES[V.CATEGORY_INDEX[d.category]].singular))
    return " ".join(words)


def expression_text(expr: Expression, rng: random.Random) -> tuple[str, tuple[int, int]]:
    """The words of an expression and the character span of the target's noun phrase (MDETR's tokens_positive)."""
    target = _phrase(expr.target, rng)
    if expr.extreme is not None:
        text = rng.choice(EXTREME_WORDS[expr.extreme]).format(target)
    elif expr.relation is not None:
        rel = rng.choice(V.RELATION_WORDS[expr.relation])
        text = f"the {target} {rel} the {_phrase(expr.landmark, rng)}"
    else:
        text = f"the {target}"
    start = text.index(target)
    return text, (start, start + len(target))


def sample_grounding_scene(
    rng: random.Random, categories: Sequence[str], colours_for: ColourRule, setting: Setting | None = None
) -> SceneSpec:
    """2-4 non-overlapping objects from ``categories`` (some repeating an earlier category, or its colour too, so
    that attributes and places are needed to tell them apart), placed by the setting's layout."""
    while True:
        count = rng.choice(COUNTS)
        looks: list[tuple[str, str]] = []
        for k in range(count):
            r = rng.random()
            if k and r < SAME_LOOK:
                looks.append(rng.choice(looks))
            elif k and r < SAME_LOOK + SAME_CATEGORY:
                cat = rng.choice(looks)[0]
                looks.append((cat, rng.choice(list(colours_for(cat)))))
            else:
                cat = rng.choice(list(categories))
                looks.append((cat, rng.choice(list(colours_for(cat)))))
        placed: list[ObjectSpec] = []
        for cat, colour in looks:
            size = rng.choice(V.SIZES)
            fill = rng.choice(V.CATEGORIES[V.CATEGORY_INDEX[cat]].fills)
            extent = round(EXTENT[size] + rng.uniform(-1.0, 1.0), 2)
            lo, hi = MARGIN + extent / 2, CANVAS - MARGIN - extent / 2
            ylo, yhi = band_range(lo, hi, setting.layout if setting else None)
            for _ in range(100):
                x, y = round(rng.uniform(lo, hi), 2), round(rng.uniform(ylo, yhi), 2)
                if all(abs(x - o.x) >= (extent + o.extent) / 2 + OBJECT_GAP
                       or abs(y - o.y) >= (extent + o.extent) / 2 + OBJECT_GAP for o in placed):  # fmt: skip
                    placed.append(ObjectSpec(cat, colour, size, fill, x, y, extent))
                    break
        if len(placed) >= 2:
            scene = SceneSpec("grounding", tuple(placed))
            return scene if setting is None else replace(scene, backdrop=Backdrop(setting.name, rng.getrandbits(63)))
