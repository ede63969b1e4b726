"""Class names and CLIP prompt templates, generic over datasets (ImageNet and its variants, CIFAR-100, folders,
class lists such as CUB's ``classes.txt``, the embedded world's ``classes.json``).

A :class:`ClassNames` is the label space of a classifier: display names in label order (what prompts say), the
folder or id of each class (what the files say), and the prompt templates to use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlprompt.data.imagenet_wnids import IN1K_IDS, IN_A_IDS, IN_R_IDS
from vlprompt.errors import ConfigError, DataError

SIMPLE_TEMPLATE = "a photo of a {}."

#: CIFAR-100's fine labels in label order (alphabetical, as in the dataset's meta file).
CIFAR100_CLASSES: tuple[str, ...] = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)


@dataclass(frozen=True)
class ClassNames:
    """A classifier's label space: ``names[i]`` is what prompts call class ``i``; ``folders[i]`` where it lives."""

    names: tuple[str, ...]
    folders: tuple[str, ...] = ()
    templates: tuple[str, ...] = (SIMPLE_TEMPLATE,)
    source_indices: tuple[int, ...] = field(default=(), compare=False)  # e.g. ImageNet-1k index of each class

    def __post_init__(self) -> None:
        if not self.names:
            raise DataError("a class list needs at least one class")
        if self.folders and len(self.folders) != len(self.names):
            raise DataError(f"{len(self.folders)} class folders for {len(self.names)} class names")
        for t in self.templates:
            check_template(t)

    def __len__(self) -> int:
        return len(self.names)

    def prompts(self, template: str | None = None) -> list[str]:
        """One prompt per class from ``template`` (default: the first template)."""
        return format_prompts(self.names, template or self.templates[0])


def check_template(template: str) -> str:
    """A template must hold exactly one ``{}`` where the class name goes."""
    if template.count("{}") != 1:
        raise ConfigError(f"a prompt template needs exactly one '{{}}' for the class name, got {template!r}")
    return template


def format_prompts(names: Sequence[str], template: str = SIMPLE_TEMPLATE) -> list[str]:
    """``template`` filled with each class name."""
    check_template(template)
    return [template.replace("{}", n) for n in names]


def split_template(template: str) -> tuple[str, str]:
    """``("a photo of a", ".")`` for ``"a photo of a {}."``: the words before and the text after the name."""
    before, after = check_template(template).split("{}")
    return before.strip(), after


def underscore_template(template: str) -> str:
    """The RLCF reference's prompt quirk: the words before the name joined by underscores ("a_photo_of_a {}.").

    The reference's encoder-tuning code never turns its "a_photo_of_a" prefix back into spaces, so its policy and
    reward prompts tokenise differently from the paper's; vlprompt only uses this behind a named switch.
    """
    before, after = split_template(template)
    return ("_".join(before.split()) + " {}" if before else "{}") + after


def clean_name(raw: str) -> str:
    """A display name from a folder or list entry: "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    name = re.sub(r"^\d+\.", "", raw.strip())
    return " ".join(name.replace("_", " ").split())


def imagenet_classnames() -> list[str]:
    """The 1000 cleaned ImageNet class names of CLIP's zero-shot evaluation (label order = sorted wnids)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates as ``{}`` strings (the ensemble of the CLIP paper)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@dataclass(frozen=True)
class Variant:
    """How one ImageNet variant names its folders and which ImageNet-1k classes it holds."""

    description: str
    subset: tuple[str, ...] | None = None  # wnids of a class subset (None = all 1000)
    index_folders: bool = False  # folders are class indices (ImageNet-V2), not wnids


VARIANTS: dict[str, Variant] = {
    "imagenet": Variant("ImageNet-1k validation set, val/<wnid>/*.JPEG (50,000 images)"),
    "imagenet-a": Variant("ImageNet-A, <wnid>/*.jpg, 200 classes (7,500 images)", tuple("n" + w for w in IN_A_IDS)),
    "imagenet-r": Variant("ImageNet-R, <wnid>/*.jpg, 200 classes (30,000 images)", tuple("n" + w for w in IN_R_IDS)),
    "imagenet-v2": Variant("ImageNet-V2 matched-frequency, <class index>/*.jpeg (10,000 images)", index_folders=True),
    "imagenet-sketch": Variant("ImageNet-Sketch, <wnid>/*.JPEG, 1000 classes (50,889 images)"),
}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in label order."""
    return ["n" + w for w in IN1K_IDS]


def variant_classes(name: str) -> ClassNames:
    """The label space of an ImageNet variant: CLIP's class names, folders and ImageNet-1k indices."""
    variant = _variant(name)
    names, wnids = imagenet_classnames(), imagenet_wnids()
    if variant.subset is not None:
        index = {w: i for i, w in enumerate(wnids)}
        indices = [index[w] for w in variant.subset]
    else:
        indices = list(range(len(wnids)))
    folders = [str(i) if variant.index_folders else wnids[i] for i in indices]
    return ClassNames(tuple(names[i] for i in indices), tuple(folders), source_indices=tuple(indices))


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown ImageNet variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def read_class_file(path: str | Path) -> ClassNames:
    """Class names from a file.

    - ``.json``: ``{"classes": [folder...], "names": [name...], "templates": [...]}`` (the embedded world's
      ``classes.json``; ``names`` and ``templates`` optional), a list of names, or ``{folder: name}``.
    - anything else: one class per line, ``name``, ``001.Name`` (CUB) or ``<folder> <name words>`` (wnid lists).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read class list {path}: {err}") from err
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
        if isinstance(data, list):
            return ClassNames(tuple(clean_name(str(n)) for n in data), tuple(str(n) for n in data))
        if isinstance(data, dict) and "classes" in data:
            folders = tuple(str(c) for c in data["classes"])
            names = tuple(str(n) for n in data.get("names") or [clean_name(f) for f in folders])
            templates = tuple(data.get("templates") or (SIMPLE_TEMPLATE,))
            return ClassNames(names, folders, templates)
        if isinstance(data, dict):
            return ClassNames(tuple(str(v) for v in data.values()), tuple(str(k) for k in data))
        raise DataError(f"{path}: expected a list of names or an object, got {type(data).__name__}")
    folders, names = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        first, _, rest = line.strip().partition(" ")
        if rest and (first.isdigit() or re.fullmatch(r"n\d{8}", first)):  # "12 name" or "n01440764 tench"
            folders.append(first if not first.isdigit() else rest.strip())
            names.append(clean_name(rest))
        else:
            folders.append(line.strip())
            names.append(clean_name(line))
    return ClassNames(tuple(names), tuple(folders))


def folder_classes(root: str | Path) -> ClassNames:
    """The sorted sub-folders of an ImageFolder tree, named by :func:`clean_name`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders")
    return ClassNames(tuple(clean_name(f) for f in folders), tuple(folders))


def load_class_names(spec: str, root: str | Path | None = None) -> ClassNames:
    """Class names by name (``imagenet``, ``imagenet-a``, ``imagenet-r``, ``imagenet-v2``, ``imagenet-sketch``,
    ``cifar100``), from a file (relative paths resolve against ``root``), or ``""``/``folders``: ``root``'s folders.
    """
    if spec in VARIANTS:
        return variant_classes(spec)
    if spec == "cifar100":
        return ClassNames(tuple(clean_name(n) for n in CIFAR100_CLASSES), CIFAR100_CLASSES)
    if spec in ("", "folders"):
        if root is None:
            raise ConfigError("class names from folders need a data root")
        return folder_classes(root)
    path = Path(spec).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.exists():
        known = ", ".join([*VARIANTS, "cifar100", "folders"])
        raise ConfigError(f"class names {spec!r}: no such file ({path}) and not one of: {known}")
    return read_class_file(path)
