"""Typed configs: dataclasses loaded from YAML with ``key=value`` overrides (OmegaConf structured configs).

Unknown keys are errors that list the valid keys. ``key=`` or ``key=null`` (``key: null`` in YAML) unsets an
optional key: an empty string or list, or None where the field is optional (:func:`~vlprompt.options.unset_nulls`).
Every numeric option declares its allowed range and every enumerated string option its allowed values in its field
(:mod:`vlprompt.options`); :func:`load_config` enforces them for the config sections and for the chosen method's own
``Options`` dataclass (the methods layer, below this module).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlprompt.errors import ConfigError
from vlprompt.methods.build import method_options
from vlprompt.options import (
    check_fields,
    choice,
    count,
    name_list,
    nonneg,
    positive,
    ranged,
    subset,
    unit,
    unset_nulls,
)

#: Largest seed NumPy's ``RandomState`` accepts (the seeds below feed it).
MAX_SEED = 2**32 - 1


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
class GroundingConfig:
    """Referring-expression grounding: ``vlprompt continual`` with a grounding method. ``data.format``
    ``mdetr-refexp``: ``data.train/val/test`` are MDETR ``finetune_<dataset>_<split>.json`` files; ``refer``: refer
    split names (``testA``...) of the folder ``dataset``. Tasks: ``continual.tasks`` ("" = ``coco``, LPI's 12)."""

    images: str = ""  # folder the image file names resolve against (COCO train2014/), under data.root; "" = data.root
    dataset: str = ""  # refcoco | refcoco+ | refcocog (the world: world): MDETR files must hold it; refer: its folder
    split_by: str = ""  # refer layout: refs(<split_by>).p ("" = the dataset's usual one: unc, umd)
    min_side: float = nonneg(1.0)  # training leaves out targets with a side <= this many pixels (GLIP, LPI)
    # an OWL-ViT / OWLv2 checkpoint in the transformers format (folder, or Hub id in the local cache): its towers
    # and heads replace backbone.* ("" = backbone.* with new heads; "world" = the world's pretrained detector,
    # heads and fine-tuned towers, on backbone vlprompt-tiny / world)
    detector: str = ""


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
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
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
    method_options(cfg.method)  # the method section's schema is the chosen method's Options dataclass
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
