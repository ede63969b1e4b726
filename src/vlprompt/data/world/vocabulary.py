"""The embedded world's vocabulary: categories, attributes, their words and synonyms, and class prompt templates.

Everything here is a constant; changing any of it changes the world's bytes, so bump ``WORLD_VERSION``.
"""

from __future__ import annotations

from dataclasses import dataclass

WORLD_VERSION = 2  # 2: per-super-category settings in the continual part, the grounding part


@dataclass(frozen=True)
class Category:
    """One object category: how it is drawn (a shape name or a glyph) and the words that name it."""

    name: str  # canonical noun phrase, also used in class names
    supercategory: int  # 1-based super-category id
    shape: str  # a shape name known to render.py, or "glyph"
    glyph: str  # the character drawn when shape == "glyph"
    singular: tuple[str, ...]  # synonyms; the first is canonical
    plural: tuple[str, ...]
    fills: tuple[str, ...]  # fills it may take; glyph strokes are too thin to show stripes, dots or an outline

    @property
    def has_fill(self) -> bool:
        """Whether captions mention its fill (only when it varies)."""
        return len(self.fills) > 1


def _cat(
    name: str, sc: int, shape: str, singular: tuple[str, ...], plural: tuple[str, ...], glyph: str = ""
) -> Category:
    fills = ("solid",) if shape == "glyph" else FILLS
    return Category(name, sc, shape, glyph, singular, plural, fills)


FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "outline")

SUPERCATEGORIES: tuple[str, ...] = ("polygons", "curved shapes", "marks", "letters", "digits", "symbols")

CATEGORIES: tuple[Category, ...] = (
    # 1 polygons
    _cat("triangle", 1, "triangle", ("triangle",), ("triangles",)),
    _cat("square", 1, "square", ("square", "box"), ("squares", "boxes")),
    _cat("pentagon", 1, "pentagon", ("pentagon",), ("pentagons",)),
    _cat("hexagon", 1, "hexagon", ("hexagon",), ("hexagons",)),
    # 2 curved shapes
    _cat("circle", 2, "circle", ("circle", "disc"), ("circles", "discs")),
    _cat("oval", 2, "oval", ("oval", "ellipse"), ("ovals", "ellipses")),
    _cat("crescent", 2, "crescent", ("crescent", "crescent moon"), ("crescents", "crescent moons")),
    _cat("heart", 2, "heart", ("heart",), ("hearts",)),
    # 3 marks
    _cat("plus sign", 3, "plus", ("plus sign", "plus"), ("plus signs",)),
    _cat("cross", 3, "cross", ("cross", "x mark"), ("crosses", "x marks")),
    _cat("arrow", 3, "arrow", ("arrow",), ("arrows",)),
    _cat("star", 3, "star", ("star",), ("stars",)),
    # 4 letters (chosen so no letter looks like a digit)
    _cat("letter a", 4, "glyph", ("letter a", "capital a"), ("letter a's", "capital a's"), "A"),
    _cat("letter h", 4, "glyph", ("letter h", "capital h"), ("letter h's", "capital h's"), "H"),
    _cat("letter k", 4, "glyph", ("letter k", "capital k"), ("letter k's", "capital k's"), "K"),
    _cat("letter r", 4, "glyph", ("letter r", "capital r"), ("letter r's", "capital r's"), "R"),
    # 5 digits (written as numerals so they never clash with count words)
    _cat("digit 2", 5, "glyph", ("digit 2", "number 2", "numeral 2"), ("digit 2s", "number 2s"), "2"),
    _cat("digit 3", 5, "glyph", ("digit 3", "number 3", "numeral 3"), ("digit 3s", "number 3s"), "3"),
    _cat("digit 4", 5, "glyph", ("digit 4", "number 4", "numeral 4"), ("digit 4s", "number 4s"), "4"),
    _cat("digit 7", 5, "glyph", ("digit 7", "number 7", "numeral 7"), ("digit 7s", "number 7s"), "7"),
    # 6 symbols
    _cat("ampersand", 6, "glyph", ("ampersand", "and sign"), ("ampersands",), "&"),
    _cat("percent sign", 6, "glyph", ("percent sign", "percent symbol"), ("percent signs", "percent symbols"), "%"),
    _cat("hash sign", 6, "glyph", ("hash sign", "hash symbol"), ("hash signs", "hash symbols"), "#"),
    _cat("question mark", 6, "glyph", ("question mark",), ("question marks",), "?"),
)
CATEGORY_INDEX = {c.name: i for i, c in enumerate(CATEGORIES)}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 45),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 45, 175),
    "orange": (245, 125, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: tuple[str, ...] = ("small", "large")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}

FILL_WORDS = {
    "solid": ("solid", "filled"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
    "outline": ("outlined", "hollow"),
}
# Alternative phrasing after the noun ("a red star with stripes").
FILL_SUFFIX = {
    "solid": ("with a solid fill",),
    "striped": ("with stripes",),
    "dotted": ("with dots", "with polka dots"),
    "outline": ("drawn as an outline", "in outline"),
}

# Single objects sit on a 3x3 grid; (row, col) -> phrases.
POSITION_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
POSITION_WORDS = {
    "top left": ("in the top left corner", "in the upper left", "at the top left"),
    "top": ("at the top", "near the top", "in the upper middle"),
    "top right": ("in the top right corner", "in the upper right", "at the top right"),
    "left": ("on the left", "at the left side", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side", "on the right side"),
    "bottom left": ("in the bottom left corner", "in the lower left", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "in the lower right", "at the bottom right"),
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

COUNT_WORDS = {1: ("a",), 2: ("two", "a pair of"), 3: ("three",)}

# Category-colour pairs never shown in the base (pretraining) part: category i loses colour i mod 6, so every
# colour is held out for four categories and every super-category loses four different colours.
HELD_OUT_BASE: frozenset[tuple[str, str]] = frozenset(
    (c.name, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, c in enumerate(CATEGORIES)
)

# Fine classification labels: category x these colours = 96 classes, category-major.
CLASS_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
CLASS_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a picture of a {}.",
    "a rendering of a {}.",
    "a blurry photo of a {}.",
    "a noisy photo of a {}.",
    "a low contrast photo of a {}.",
    "a {} on a textured background.",
    "an image of a {}.",
)

# Video events (see video.py): the words for each step, per direction/kind.
MOVE_WORDS = {
    "right": ("moves to the right", "slides right", "moves from left to right"),
    "left": ("moves to the left", "slides left", "moves from right to left"),
    "up": ("moves up", "rises", "moves upward"),
    "down": ("moves down", "drops", "moves downward"),
}
OPPOSITE_DIRECTION = {"right": "left", "left": "right", "up": "down", "down": "up"}
GROW_WORDS = ("grows", "gets bigger", "grows larger")
SHRINK_WORDS = ("shrinks", "gets smaller", "becomes smaller")
RECOLOUR_WORDS = ("turns {}", "changes to {}", "becomes {}")
APPEAR_WORDS = ("appears", "shows up", "pops up")
DISAPPEAR_WORDS = ("disappears", "vanishes", "goes away")


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[:1] in "aeiou" or word.startswith("x ") else "a"
