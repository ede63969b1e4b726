"""Typed configs: dataclasses loaded from YAML with ``key=value`` overrides (OmegaConf structured configs).

Unknown keys are errors that list the valid keys. ``key=`` or ``key=null`` (``key: null`` in YAML) unsets an
optional key: an empty string or list, or None where the field is optional (:func:`unset_nulls`). Every numeric
option declares its allowed range and every enumerated string option its allowed values in its field
(:func:`ranged`, :func:`choice` and the shortcuts :func:`count`, :func:`nonneg`, :func:`positive`, :func:`unit`);
:func:`check_fields` enforces them when a config is loaded, for the config sections and for the chosen method's own
``Options`` dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlprompt.errors import ConfigError

#: Field metadata keys of the declarations below.
RANGE, CHOICES = "range", "choices"
#: Field metadata key of :func:`subset`: a list whose items must be among the allowed names.
SUBSET = "subset"
#: Largest seed NumPy's ``RandomState`` accepts (the seeds below feed it).
MAX_SEED = 2**32 - 1


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: optional bounds (``ge``/``gt`` below, ``le``/``lt`` above) and one
    optional ``off`` value outside them (e.g. ``0`` = "off"). Floats must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    off: float | None = None

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, integer: bool) -> str:
        """``"an integer >= 1"``, ``"a finite number in [0, 1)"``, ``"0 or an integer >= 3"``..."""
        kind = "an integer" if integer else "a finite number"
        low = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">") if self.gt is not None else None
        high = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<") if self.lt is not None else None
        if low and high:
            text = f"{kind} in {low[1]}{_num(low[0])}, {_num(high[0])}{high[1]}"
        elif low or high:
            bound, _, op = low or high
            text = f"{kind} {op} {_num(bound)}"
        else:
            text = kind
        return text if self.off is None else f"{_num(self.off)} or {text}"


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    off: float | None = None,
) -> Any:
    """A dataclass field whose value (or each element, for lists and tuples) must lie in the given range."""
    meta = {RANGE: Range(ge, gt, le, lt, off)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def count(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field holding a count: an integer >= 1."""
    return ranged(default, ge=1, **kw)


def nonneg(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field >= 0 (weights, decays, "0 = off / all / automatic" counts)."""
    return ranged(default, ge=0, **kw)


def positive(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field > 0 (learning rates, temperatures, epsilons)."""
    return ranged(default, gt=0, **kw)


def unit(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field in [0, 1] (fractions, interpolation weights)."""
    return ranged(default, ge=0, le=1, **kw)


def choice(default: str, *allowed: str) -> Any:
    """A string field that must be one of ``allowed`` (``default`` included)."""
    return field(default=default, metadata={CHOICES: (default, *[a for a in allowed if a != default])})


def subset(*allowed: str) -> Any:
    """A list-of-names field (default empty) whose items must be among ``allowed``; see :func:`name_list`."""
    return field(default_factory=list, metadata={SUBSET: allowed})


def name_list(value: Any) -> Any:
    """A :func:`subset` field's value as a list: ``"a,b"`` and ``"a, b"`` become ``["a", "b"]``, ``None``, ``""`` and
    ``"none"`` become ``[]`` (so both open_clip's ``--report-to a,b`` and a YAML list work); anything else is kept
    for :func:`check_fields` to reject."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        names = [v.strip() if isinstance(v, str) else v for v in value]
        return [v for v in names if v not in ("", "none")]
    return value


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every declared range and choice of dataclass ``obj`` (recursing into nested dataclasses);
    the :class:`ConfigError` names the key (``prefix`` + field name), the value and what is allowed."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
        elif RANGE in f.metadata:
            rng: Range = f.metadata[RANGE]
            items = list(value) if isinstance(value, list | tuple) else [value]
            if any(v not in rng for v in items):
                integer = all(isinstance(v, int) for v in items)
                each = "each must be" if isinstance(value, list | tuple) else "must be"
                raise ConfigError(f"{key} = {value!r}: {each} {rng.describe(integer)}")
        elif CHOICES in f.metadata and value not in f.metadata[CHOICES]:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(f.metadata[CHOICES])}")
        elif SUBSET in f.metadata and (
            not isinstance(value, list) or any(v not in f.metadata[SUBSET] for v in value)
        ):
            raise ConfigError(f"{key} = {value!r}: each must be one of {', '.join(f.metadata[SUBSET])}")


@dataclass
class BackboneConfig:
    name: str = "vlprompt-tiny"  # open_clip architecture, hf-hub:..., local-dir:... or an embedded model
    pretrained: str | None = "world"  # open_clip tag, checkpoint path, "world" (embedded models) or null
    # weights' precision, as open_clip's --precision
    precision: str = choice("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_bfloat16")


@dataclass
class DataConfig:
    format: str = "karpathy"  # annotation format, see `vlprompt list datasets`
    root: str = ""  # image root / annotation folder; relative paths resolve against it
    train: str = ""  # annotation files ("default" = a video format's standard file of that split; "" = none)
    val: str = ""
    test: str = ""
    # Karpathy files: where relative image paths resolve (README "Real data layout"; data.sources.split_files)
    images_from: str = choice("auto", "root", "annotation")
    video_root: str = ""  # video formats: folder of the videos (default: <root>/videos)
    num_frames: int = count(12)  # video formats: frames sampled per video (segment sampling)
    order_pairs: str = ""  # video formats: JSON list of [video_id, video_id] time-reversed test pairs (order metric)
    # captions are cut to this many tokens, start/end-of-text included (0 = the model's context); 3 = one word
    max_words: int = ranged(0, ge=3, off=0)
    strict: bool = False  # a missing or unreadable media file is an error instead of a skipped sample
    num_workers: int = nonneg(0)


@dataclass
class TrainConfig:
    epochs: int = nonneg(5)  # 0 = no training (zero-shot rows of continual recipes)
    max_steps: int = nonneg(0)  # stop after this many optimizer steps (0 = run all epochs)
    batch_size: int = count(64)
    eval_batch_size: int = count(256)
    optimizer: str = choice("adamw", "sgd")
    lr: float = positive(2e-3)
    weight_decay: float = nonneg(0.0)
    momentum: float = ranged(0.9, ge=0, lt=1)  # sgd only
    betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)  # adamw only
    eps: float = positive(1e-8)  # adamw only
    warmup_steps: int = nonneg(0)
    warmup_fraction: float = unit(0.0)  # warmup as a fraction of all steps (used when warmup_steps is 0)
    schedule: str = choice("cosine", "constant")
    grad_accum: int = count(1)  # micro-batches per optimizer step
    grad_clip: float = nonneg(0.0)  # max gradient norm (0 = off)
    autocast: str = choice("none", "bf16", "fp16")
    grad_checkpointing: bool = False
    # epochs between validations on data.val, plus one at the end (>= epochs: only at the end; 0 = never, and
    # data.val is not read)
    eval_every: int = nonneg(1)
    checkpoint_every: int = nonneg(0)  # optimizer steps between checkpoints (0 = at the end of each epoch)


@dataclass
class ContinualConfig:
    """``vlprompt continual``: a task sequence trained one task at a time (train.* applies to each task)."""

    tasks: str = ""  # tasks.json (relative to data.root), "coco" (LPI's 12 tasks) or "" (the train file's categories)
    # category ids in task order (overrides the order of `tasks`); ids are labels, any integer
    order: list[int] = ranged(factory=list)
    category_key: str = "category"  # the annotation field holding each record's category id
    eval_split: str = choice("val", "test")  # after task t, evaluate on the union of this split's files of tasks 0..t
    eval_gallery: str = choice("seen", "all")  # seen: tasks 0..t (LPI); all: every task's set each time (fixed)
    oracle_task: bool = False  # give the method the true task at test time (no routing)
    max_tasks: int = nonneg(0)  # stop after this many tasks (0 = all)
    lr_per_epoch: bool = False  # cosine stepped once per epoch (LPI's CosineAnnealingLR) instead of per step
    task_similarity: str = ""  # LPI's related tasks: "coco", a [T, T] matrix file (> threshold), "" = none
    task_similarity_threshold: float = ranged(0.4)  # on the file's own scale: any finite number


@dataclass
class TTAConfig:
    """``vlprompt tta``: episodic test-time adaptation, one test sample at a time (RLCF, TPT)."""

    steps: int = nonneg(3)  # adaptation steps per sample (0 = zero-shot)
    lr: float = positive(7e-3)
    weight_decay: float = nonneg(5e-4)
    eps: float = positive(1e-8)  # AdamW epsilon (the retrieval recipes use 1e-6)
    views: int = count(64)  # classification: views per image, view 0 = the centre crop
    selection: float = ranged(0.1, gt=0, le=1)  # classification: fraction of lowest-entropy views kept
    augmix: bool = False  # classification: AugMix-style views (TPT's fine-grained setting)
    classes: str = ""  # class names: imagenet[-a|-r|-v2|-sketch], cifar100, a file under data.root, "" = folders
    max_samples: int = nonneg(0)  # adapt on the first N samples of the (seeded) order; 0 = all
    shuffle: bool = True  # seeded sample order (only the momentum variant depends on it)
    momentum: bool = False  # RLCF-S-M: momentum average of the tuned weights becomes the next start point
    momentum_m: float = unit(0.9998)
    momentum_every: int = count(64)  # F: samples between refreshes of the start point
    momentum_weight: float = unit(1.0)  # w: start = (1 - w) * initial + w * momentum average
    autocast: str = choice("none", "bf16")


@dataclass
class CILConfig:
    """Class-incremental classification: ``vlprompt continual`` with a class-incremental method (itprompt, l2p_cil,
    dualprompt, coda_prompt, hide_prompt, zeroshot_cil); train.* applies to each task."""

    num_tasks: int = count(10)  # tasks of a generated split (ignored when `tasks` names a split file)
    tasks: str = ""  # split file ({"tasks": [[class ids], ...]}) relative to data.root; "" = generate from a seed
    shuffle_classes: bool = True  # generated split: seeded class permutation (False = label order)
    order_seed: int = ranged(-1, ge=-1, le=MAX_SEED)  # seed of that permutation (-1 = the run's seed)
    classes: str = ""  # class names: cifar100, imagenet-r, a file under data.root ("" = the format's own / folders)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # text anchors, averaged
    eval_split: str = choice("test", "val")
    # ImageNet-R without train/test trees: per-class held-out fraction (CODA's 80/20)
    test_fraction: float = ranged(0.2, gt=0, lt=1)
    holdout_seed: int = ranged(0, ge=0, le=MAX_SEED)  # seed of that hold-out (fixed across runs, unlike the order)
    # train (augmented views) | eval (deterministic; frozen queries computed once)
    train_transform: str = choice("train", "eval")
    max_train_per_class: int = nonneg(0)  # keep the first N training images of each class (0 = all)
    max_tasks: int = nonneg(0)  # stop after this many tasks (0 = all)
    oracle_eval: bool = False  # task-routing methods: also report accuracy with the true task (acc_oracle)


@dataclass
class LogConfig:
    """Experiment tracking, as open_clip's ``--report-to``: losses, learning rate, every evaluated metric, continual
    accuracy matrices and TTA gains also go to TensorBoard (``RUN_DIR/tensorboard``) and/or Weights & Biases
    (optional packages: ``pip install 'vlprompt[track]'``). Rank 0 alone reports."""

    report_to: Any = subset("tensorboard", "wandb")  # a list or a comma string ("tensorboard,wandb"); [] = files only
    every_steps: int = count(10)  # optimizer steps between reported training losses
    wandb_project: str = "vlprompt"  # W&B project (the entity comes from W&B's own login or WANDB_ENTITY)

    def __post_init__(self) -> None:
        self.report_to = name_list(self.report_to)


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "zeroshot"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    cil: CILConfig = field(default_factory=CILConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    out_dir: str = "runs"
    run_name: str = ""  # default: the config file's stem
    resume: bool = False  # continue from the run directory's last checkpoint


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        value = getattr(schema, f.name) if not isinstance(schema, type) else None
        if dataclasses.is_dataclass(f.type) or (value is not None and dataclasses.is_dataclass(value)):
            keys.extend(_valid_keys(value or f.type, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _friendly(err: OmegaConfBaseException, schema: Any) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(_valid_keys(schema))}")
    return ConfigError(f"bad value for config key {key!r}: {getattr(err, 'msg', err)}")


def _empty_value(hint: Any, f: dataclasses.Field, key: str) -> Any:
    """What unsetting field ``f`` means: None for optional fields, ``""`` for strings, ``[]`` for lists."""
    origin = typing.get_origin(hint)
    if hint is Any or (origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)):
        return None
    if CHOICES in f.metadata:
        raise ConfigError(f"{key} cannot be unset: it must be one of {', '.join(f.metadata[CHOICES])}")
    if hint is str:
        return ""
    if origin is list:
        return []
    if RANGE in f.metadata:
        what = f.metadata[RANGE].describe(hint is int or typing.get_args(hint)[:1] == (int,))
        what = f"a list, each {what}" if origin is tuple else what
    else:
        what = "true or false" if hint is bool else getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} cannot be unset ({key}= or {key}=null): it takes {what}; give a value")


def unset_nulls(values: Any, schema: type, prefix: str = "") -> Any:
    """``values`` (plain dicts, as parsed from YAML or ``key=value``) with every null replaced by what unsetting that
    key of dataclass ``schema`` means (:func:`_empty_value`), recursing into nested sections; a key that cannot be
    unset (a number, a flag, an enumerated choice) is a :class:`ConfigError` naming it. Unknown keys are kept for the
    merge to report."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return values
    try:
        hints = typing.get_type_hints(schema)
    except (NameError, TypeError):  # an annotation that cannot be resolved: leave the nulls to OmegaConf's message
        return values
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = {}
    for key, value in values.items():
        f, hint = fields.get(key), hints.get(key)
        if f is not None and value is None:
            value = _empty_value(hint, f, prefix + key)
        elif f is not None and isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = unset_nulls(value, hint, f"{prefix}{key}.")
        out[key] = value
    return out


def _nulls_unset(layer: DictConfig) -> DictConfig:
    """One config layer (a YAML file or the overrides) with :func:`unset_nulls` applied against :class:`Config`."""
    values = OmegaConf.to_container(layer, resolve=False)
    return OmegaConf.create(unset_nulls(values, Config)) if isinstance(values, dict) else layer


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked against :class:`Config`, every range and
    choice checked (:func:`check_fields`), the method's options included."""
    schema = OmegaConf.structured(Config)
    layers: list[DictConfig] = [schema]
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        layers.append(_nulls_unset(OmegaConf.load(path)))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        layers.append(_nulls_unset(OmegaConf.from_dotlist(list(overrides))))
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise _friendly(err, Config()) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if not cfg.run_name and path is not None:
        cfg.run_name = path.stem
    check_fields(cfg)
    # The method section's schema is the chosen method's Options dataclass, which lives in the methods layer
    # (imported here, not at module level: methods import this module).
    from vlprompt.methods.build import method_options

    method_options(cfg.method)
    return cfg


def options_from_dict(schema: type, values: dict[str, Any], where: str, prefix: str = "method.") -> Any:
    """Typed options dataclass from a plain dict; unknown keys, wrong types and values outside the fields'
    declared ranges or choices are :class:`ConfigError` (range errors name the key as ``prefix`` + field)."""
    valid = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {where}; valid options: {', '.join(valid) or '(none)'}")
    values = unset_nulls(values, schema, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad option for {where}: {getattr(err, 'msg', err)}") from None
    options = OmegaConf.to_object(merged)
    check_fields(options, prefix)
    return options


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
