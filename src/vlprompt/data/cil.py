"""Class-incremental classification data: readers, seeded disjoint class splits, labelled image sets.

Readers (``data.format``):

- ``cifar100``: the CIFAR-100 python pickles (``cifar-100-python/{train,test,meta}`` under ``data.root``, or the
  three files directly in it); images stay in memory as uint8 arrays.
- ``imagenet-r``: ``<root>/<wnid>/*.jpg`` (the release has no train/test split: a seeded per-class hold-out of
  ``cil.test_fraction`` becomes the test set, CODA-Prompt's 80/20), or ``<root>/train/<wnid>``, ``<root>/test/<wnid>``.
- ``cub200``: ``CUB_200_2011`` (``images.txt``, ``train_test_split.txt``, ``image_class_labels.txt``,
  ``classes.txt``, ``images/``: the official split), or ``<root>/train/<class>``, ``<root>/test/<class>``.
- ``imagefolder``: ``data.train`` / ``data.test`` (or ``data.val``) are class-folder trees under ``data.root``; the
  label space comes from ``cil.classes`` (e.g. the embedded world's ``classification/classes.json``) or the folders.

A :class:`ClassSplit` lists the original class ids of every task; classes are disjoint across tasks and cover the
label space. Everything downstream works in *positions*: class ``order[p]`` has position ``p``, so task ``t`` owns
positions ``offsets[t] .. offsets[t+1] - 1`` and "the classes seen after task t" is the prefix ``[0, offsets[t+1])``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlprompt.data.classnames import CIFAR100_CLASSES, ClassNames, clean_name, load_class_names
from vlprompt.data.media import BadSamples, drop_missing, image_files, load_or_skip
from vlprompt.errors import ConfigError, DataError
from vlprompt.safe_pickle import NUMPY_ARRAYS, load_pickle

CIL_FORMATS: dict[str, str] = {
    "cifar100": "CIFAR-100 python pickles (cifar-100-python/{train,test,meta})",
    "imagenet-r": "ImageNet-R <wnid>/*.jpg (seeded per-class hold-out) or train/ and test/ trees",
    "cub200": "CUB_200_2011 (images.txt, train_test_split.txt, image_class_labels.txt) or train/ and test/ trees",
    "imagefolder": "class-folder trees data.train / data.test under data.root; names from cil.classes",
}


# ==== class splits ==================================================================================================
@dataclass(frozen=True)
class ClassSplit:
    """Disjoint tasks of original class ids, in training order (``seed`` = the permutation's seed, if generated)."""

    tasks: tuple[tuple[int, ...], ...]
    seed: int | None = None

    @property
    def order(self) -> tuple[int, ...]:
        """Original class id of every position."""
        return tuple(c for task in self.tasks for c in task)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return sum(len(t) for t in self.tasks)

    @property
    def task_sizes(self) -> list[int]:
        return [len(t) for t in self.tasks]

    @property
    def offsets(self) -> list[int]:
        """``offsets[t]`` = first position of task ``t``; ``offsets[-1]`` = number of classes."""
        return [int(v) for v in np.concatenate([[0], np.cumsum(self.task_sizes)])]

    def position_of(self) -> dict[int, int]:
        """Original class id -> position."""
        return {c: p for p, c in enumerate(self.order)}

    def truncated(self, num_tasks: int) -> ClassSplit:
        """The first ``num_tasks`` tasks only (``cil.max_tasks``)."""
        return ClassSplit(self.tasks[:num_tasks], self.seed)

    def to_json(self) -> dict[str, Any]:
        """The world's ``cil_tasks.json`` layout (plus the seed), saved with every run."""
        return {"num_tasks": self.num_tasks, "class_order": list(self.order), "tasks": [list(t) for t in self.tasks],
                "seed": self.seed}  # fmt: skip


def check_split(split: ClassSplit, num_classes: int, where: str = "class split") -> ClassSplit:
    """Tasks must be non-empty, disjoint and cover exactly classes ``0 .. num_classes - 1``."""
    if not split.tasks or any(not t for t in split.tasks):
        raise DataError(f"{where}: every task needs at least one class")
    flat = split.order
    if len(set(flat)) != len(flat):
        twice = sorted({c for c in flat if flat.count(c) > 1})
        raise DataError(f"{where}: tasks are not disjoint (class(es) {twice[:5]} appear twice)")
    missing = sorted(set(range(num_classes)) - set(flat))
    extra = sorted(set(flat) - set(range(num_classes)))
    if missing or extra:
        raise DataError(f"{where}: tasks must cover classes 0..{num_classes - 1} exactly "
                        f"(missing {missing[:5]}, unknown {extra[:5]})")  # fmt: skip
    return split


def make_class_split(num_classes: int, num_tasks: int, seed: int, shuffle: bool = True) -> ClassSplit:
    """``num_tasks`` disjoint tasks over a seeded permutation of the classes (label order when not ``shuffle``).

    Task ``t`` takes positions ``round(t C / T) .. round((t+1) C / T) - 1`` (equal sizes when ``T`` divides ``C``).
    The permutation is NumPy's ``RandomState(seed)``, so the order is the same on every machine and version.
    """
    if not 1 <= num_tasks <= num_classes:
        raise ConfigError(f"cil.num_tasks must be in 1..{num_classes} (the number of classes), got {num_tasks}")
    order = np.random.RandomState(seed).permutation(num_classes) if shuffle else np.arange(num_classes)
    bounds = [round(t * num_classes / num_tasks) for t in range(num_tasks + 1)]
    tasks = tuple(tuple(int(c) for c in order[bounds[t] : bounds[t + 1]]) for t in range(num_tasks))
    return check_split(ClassSplit(tasks, seed if shuffle else None), num_classes)


def read_class_split(path: str | os.PathLike, num_classes: int) -> ClassSplit:
    """A split file: ``{"tasks": [[class ids], ...]}`` (the world's ``cil_tasks.json``) or a plain list of lists."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise DataError(f"cannot read class split {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    tasks = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(tasks, list) or not all(isinstance(t, list) for t in tasks):
        raise DataError(f"{path}: expected {{'tasks': [[class ids], ...]}}")
    try:
        split = ClassSplit(tuple(tuple(int(c) for c in t) for t in tasks), data.get("seed") if isinstance(data, dict)
                           else None)  # fmt: skip
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: class ids must be integers ({err})") from err
    return check_split(split, num_classes, str(path))


# ==== labelled images ===============================================================================================
class LabeledImages(Dataset):
    """Items ``(image, label, index)`` from image files or an in-memory ``uint8 [N, H, W, 3]`` array.

    ``labels`` start as original class ids; :meth:`relabel` maps them to split positions. A file that fails to
    decode comes back as ``None`` (dropped by ``collate_skip_none``).
    """

    def __init__(self, sources: Sequence[Path] | np.ndarray, labels: Sequence[int], transform: Callable | None,
                 strict: bool = False) -> None:  # fmt: skip
        if len(sources) != len(labels):
            raise DataError(f"{len(sources)} images but {len(labels)} labels")
        self.sources = sources
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.strict = strict
        self.bad_samples = BadSamples()

    def __len__(self) -> int:
        return len(self.labels)

    def relabel(self, position: dict[int, int]) -> LabeledImages:
        """Replace original class ids by their positions (in place); classes outside ``position`` are an error."""
        unknown = sorted(set(self.labels.tolist()) - set(position))
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not in the class split")
        self.labels = np.asarray([position[int(y)] for y in self.labels], dtype=np.int64)
        return self

    def indices_of(self, positions: range | Sequence[int]) -> list[int]:
        """Sample indices whose label is one of ``positions``."""
        keep = np.isin(self.labels, np.asarray(list(positions), dtype=np.int64))
        return np.flatnonzero(keep).tolist()

    def __getitem__(self, i: int) -> tuple[Any, int, int] | None:
        if isinstance(self.sources, np.ndarray):
            image = Image.fromarray(self.sources[i])
            image = self.transform(image) if self.transform is not None else image
        else:
            image = load_or_skip(Path(self.sources[i]), self.transform, self.bad_samples, self.strict)
            if image is None:
                return None
        return image, int(self.labels[i]), i


@dataclass
class CILSets:
    """Raw samples of one class-incremental dataset: (sources, labels) per split and the label space."""

    train: tuple[Sequence[Path] | np.ndarray, list[int]]
    test: tuple[Sequence[Path] | np.ndarray, list[int]]
    classes: ClassNames


# ==== readers ========================================================================================================
def _unpickle(path: Path) -> dict:
    """A CIFAR python batch: a dict of bytes keys, lists and one uint8 array; nothing else may be built."""
    d = load_pickle(path, NUMPY_ARRAYS, encoding="bytes", kind="CIFAR python pickle")
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python pickle (a {type(d).__name__}, not a dict)")
    return d


def _key(d: dict, name: str) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(f"CIFAR pickle lacks {name!r} (keys: {[str(k) for k in list(d)[:6]]})")


def read_cifar100(root: str | os.PathLike, split: str) -> tuple[np.ndarray, list[int], ClassNames]:
    """CIFAR-100 ``train``/``test``: uint8 images ``[N, 32, 32, 3]``, fine labels, class names (meta or built in)."""
    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR-100 has train and test splits, not {split!r}")
    root = Path(root)
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    path = folder / split
    if not path.is_file():
        raise DataError(
            f"CIFAR-100 {split} pickle not found at {path} (expected cifar-100-python/{{train,test,meta}})"
        )
    d = _unpickle(path)
    try:
        data = np.asarray(_key(d, "data"), dtype=np.uint8)
    except (TypeError, ValueError, OverflowError) as err:  # e.g. an object array: the file is not CIFAR's
        raise DataError(f"{path}: 'data' is not an array of uint8 pixels ({err})") from err
    labels = [int(y) for y in _key(d, "fine_labels")]
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data [N, 3072] and N fine labels, got {data.shape} and {len(labels)}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # channel planes -> HWC
    names: Sequence[str] = CIFAR100_CLASSES
    if (folder / "meta").is_file():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(_unpickle(folder / "meta"),
                                                                              "fine_label_names")]  # fmt: skip
    return images, labels, ClassNames(tuple(clean_name(n) for n in names), tuple(names))


def folder_samples(root: Path, classes: ClassNames, allow_missing: bool = False) -> tuple[list[Path], list[int]]:
    """Files of ``root/<folder of class i>/**`` labelled ``i`` for every class of ``classes``."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = classes.folders or classes.names
    absent = [f for f in folders if not (root / f).is_dir()]
    if absent and not allow_missing:
        raise DataError(f"{root}: no folder for {len(absent)} class(es), e.g. {', '.join(absent[:5])}")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = image_files(root / folder) if (root / folder).is_dir() else []
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root}: no image files in any class folder")
    return paths, labels


def holdout_split(paths: list[Path], labels: list[int], fraction: float, seed: int, split: str) -> tuple[list, list]:
    """A seeded per-class hold-out: ``round(n * fraction)`` files of each class (at least one) form the test split."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"cil.test_fraction must be in (0, 1), got {fraction}")
    rng = np.random.RandomState(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep = []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in rng.permutation(len(idx))]
        n_test = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        keep += sorted(perm[:n_test] if split == "test" else perm[n_test:])
    keep.sort()
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _has_split_trees(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def read_imagenet_r(
    root: str | os.PathLike, split: str, test_fraction: float, seed: int
) -> tuple[list, list, ClassNames]:
    """ImageNet-R (200 classes, CLIP's names): ``train/`` and ``test/`` trees, or a seeded hold-out of the release."""
    root, classes = Path(root), load_class_names("imagenet-r")
    if _has_split_trees(root):
        return (*folder_samples(root / split, classes), classes)
    paths, labels = folder_samples(root, classes)
    return (*holdout_split(paths, labels, test_fraction, seed, split), classes)


def read_cub200(root: str | os.PathLike, split: str) -> tuple[list, list, ClassNames]:
    """CUB-200-2011 with its official train/test split, or ``train/`` and ``test/`` class trees."""
    root = Path(root)
    if (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    if _has_split_trees(root) and not (root / "images.txt").exists():
        classes = load_class_names("", root / "train")
        return (*folder_samples(root / split, classes), classes)
    need = ["images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt"]
    absent = [n for n in need if not (root / n).is_file()]
    if absent:
        raise DataError(f"{root}: not a CUB_200_2011 folder (missing {', '.join(absent)}) and no train/ test/ trees")
    classes = load_class_names(str(root / "classes.txt"))

    def table(name: str) -> dict[str, str]:
        rows = [line.split(maxsplit=1) for line in (root / name).read_text().splitlines() if line.strip()]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise DataError(f"{root / name}: expected '<id> <value>' lines, got {' '.join(bad[0])!r}")
        return {k: v.strip() for k, v in rows}

    images, is_train, label = table("images.txt"), table("train_test_split.txt"), table("image_class_labels.txt")
    want = "1" if split == "train" else "0"
    ids = [i for i in images if is_train.get(i) == want]
    paths = [root / "images" / images[i] for i in ids]
    labels = [int(label[i]) - 1 for i in ids]  # CUB class ids are 1-based
    return paths, labels, classes


def read_cil_sets(data: Any, cil: Any) -> CILSets:
    """The train and evaluation samples of ``data`` (a ``DataConfig``) under ``cil`` (a ``CILConfig``)."""
    fmt, root = data.format, Path(data.root).expanduser() if data.root else None
    if fmt not in CIL_FORMATS:
        known = ", ".join(f"{k} ({v})" for k, v in CIL_FORMATS.items())
        raise ConfigError(f"class-incremental data.format must be one of: {known}; got {fmt!r}")
    if root is None:
        raise ConfigError("data.root is empty: give the dataset folder")
    eval_split = cil.eval_split
    if eval_split not in ("test", "val"):
        raise ConfigError(f"cil.eval_split must be test or val, got {eval_split!r}")
    if fmt != "imagefolder" and eval_split != "test":
        raise ConfigError(f"data.format {fmt} has no validation split here: use cil.eval_split=test")
    if fmt == "cifar100":
        xs, ys, classes = read_cifar100(root, "train")
        xt, yt, _ = read_cifar100(root, "test")
        return CILSets((xs, ys), (xt, yt), classes)
    if fmt == "imagenet-r":
        tr = read_imagenet_r(root, "train", cil.test_fraction, cil.holdout_seed)
        te = read_imagenet_r(root, "test", cil.test_fraction, cil.holdout_seed)
        return CILSets(tr[:2], te[:2], tr[2])
    if fmt == "cub200":
        tr, te = read_cub200(root, "train"), read_cub200(root, "test")
        return CILSets(tr[:2], te[:2], tr[2])
    train_dir = data.train
    eval_dir = getattr(data, eval_split)
    if not train_dir or not eval_dir:
        raise ConfigError(f"imagefolder class-incremental data needs data.train and data.{eval_split} (class trees)")
    train_root, eval_root = _under(root, train_dir), _under(root, eval_dir)
    classes = load_class_names(cil.classes, root) if cil.classes else load_class_names("", train_root)
    return CILSets(
        folder_samples(train_root, classes), folder_samples(eval_root, classes, allow_missing=True), classes
    )


def _under(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


#: Classes of the fixed label spaces, known without reading the data.
FORMAT_CLASSES = {"cifar100": 100, "imagenet-r": 200, "cub200": 200}


def label_space_size(data: Any, cil: Any) -> int:
    """The number of classes :func:`read_cil_sets` finds, from class names only (no images are read): the fixed
    label spaces of CIFAR-100, ImageNet-R and CUB-200; for ``imagefolder`` ``cil.classes`` or ``data.train``'s
    folders."""
    if data.format in FORMAT_CLASSES:
        return FORMAT_CLASSES[data.format]
    if data.format != "imagefolder":
        raise ConfigError(f"class-incremental data.format must be one of {', '.join(CIL_FORMATS)}: {data.format!r}")
    if not data.root:
        raise ConfigError("data.root is empty: give the dataset folder")
    root = Path(data.root).expanduser()
    if cil.classes:
        return len(load_class_names(cil.classes, root))
    if not data.train:
        raise ConfigError("imagefolder class-incremental data needs data.train (class trees)")
    return len(load_class_names("", _under(root, data.train)))


def subsample_per_class(sources: Any, labels: list[int], limit: int) -> tuple[Any, list[int]]:
    """The first ``limit`` samples of every class, in sample order (``limit`` 0 = all)."""
    if limit <= 0:
        return sources, labels
    counts: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        if counts.get(y, 0) < limit:
            keep.append(i)
            counts[y] = counts.get(y, 0) + 1
    picked = sources[np.asarray(keep)] if isinstance(sources, np.ndarray) else [sources[i] for i in keep]
    return picked, [labels[i] for i in keep]


def drop_missing_files(sources: Any, labels: list[int], strict: bool, bad: BadSamples, where: str) -> tuple[Any, list]:
    """Remove listed files that do not exist (recorded in ``bad``; ``strict`` raises)."""
    if isinstance(sources, np.ndarray):
        return sources, labels
    missing = drop_missing(sources, bad, strict, where)
    if not missing:
        return sources, labels
    keep = [i for i, p in enumerate(sources) if p not in missing]
    return [sources[i] for i in keep], [labels[i] for i in keep]


@dataclass
class CILDatasets:
    """What a class-incremental run reads: training images under the training and the evaluation transform (the
    latter for statistics and frozen queries), the evaluation images, and the label space."""

    train: LabeledImages
    train_eval: LabeledImages
    eval: LabeledImages
    classes: ClassNames

    def restrict(self, split: ClassSplit) -> CILDatasets:
        """Labels become positions of ``split``; samples of classes outside it (``cil.max_tasks``) are dropped."""
        position = split.position_of()
        out = []
        for ds in (self.train, self.train_eval, self.eval):
            keep = [i for i, y in enumerate(ds.labels.tolist()) if y in position]
            sources = ds.sources[np.asarray(keep, dtype=np.int64)] if isinstance(ds.sources, np.ndarray) \
                else [ds.sources[i] for i in keep]  # fmt: skip
            out.append(LabeledImages(sources, ds.labels[keep].tolist(), ds.transform, ds.strict).relabel(position))
        train = out[1] if self.train is self.train_eval else out[0]
        return CILDatasets(train, out[1], out[2], self.classes)


def build_cil_datasets(sets: CILSets, data: Any, cil: Any, train_transform: Callable,
                       eval_transform: Callable) -> CILDatasets:  # fmt: skip
    """Datasets of raw ``sets`` (``read_cil_sets``): capped per class, missing files dropped, transforms attached."""
    if cil.train_transform not in ("train", "eval"):
        raise ConfigError(f"cil.train_transform must be train or eval, got {cil.train_transform!r}")
    bad = BadSamples()
    xs, ys = subsample_per_class(*sets.train, cil.max_train_per_class)
    xs, ys = drop_missing_files(xs, ys, data.strict, bad, "the training set")
    xt, yt = drop_missing_files(*sets.test, data.strict, bad, "the evaluation set")
    train_eval = LabeledImages(xs, ys, eval_transform, data.strict)
    train = train_eval if cil.train_transform == "eval" else LabeledImages(xs, ys, train_transform, data.strict)
    return CILDatasets(train, train_eval, LabeledImages(xt, yt, eval_transform, data.strict), sets.classes)
