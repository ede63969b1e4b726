"""Typed configs: dataclasses loaded from YAML with ``key=value`` overrides (OmegaConf structured configs).

Unknown keys are errors that list the valid keys. Method options are validated against the chosen
method's own ``Options`` dataclass when the method is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlprompt.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = "vlprompt-tiny"  # open_clip architecture, hf-hub:..., local-dir:... or an embedded model
    pretrained: str | None = "world"  # open_clip tag, checkpoint path, "world" (embedded models) or null
    precision: str = "fp32"  # weights' precision (open_clip): fp32, bf16, fp16, amp


@dataclass
class DataConfig:
    format: str = "karpathy"  # annotation format, see `vlprompt list datasets`
    root: str = ""  # image root / annotation folder; relative paths resolve against it
    train: str = ""  # annotation files ("default" = a video format's standard file of that split; "" = none)
    val: str = ""
    test: str = ""
    video_root: str = ""  # video formats: folder of the videos (default: <root>/videos)
    num_frames: int = 12  # video formats: frames sampled per video (segment sampling)
    order_pairs: str = ""  # video formats: JSON list of [video_id, video_id] time-reversed test pairs (order metric)
    max_words: int = 0  # captions are cut to this many tokens, start/end-of-text included (0 = the model's context)
    strict: bool = False  # a missing or unreadable media file is an error instead of a skipped sample
    num_workers: int = 0


@dataclass
class TrainConfig:
    epochs: int = 5
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    eps: float = 1e-8  # adamw only
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # warmup as a fraction of all steps (used when warmup_steps is 0)
    schedule: str = "cosine"  # cosine | constant
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max gradient norm (0 = off)
    autocast: str = "none"  # none | bf16 | fp16
    grad_checkpointing: bool = False
    eval_every: int = 1  # epochs between evaluations (0 = only at the end)
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = at the end of each epoch)


@dataclass
class ContinualConfig:
    """``vlprompt continual``: a task sequence trained one task at a time (train.* applies to each task)."""

    tasks: str = ""  # tasks.json (relative to data.root), "coco" (LPI's 12 tasks) or "" (the train file's categories)
    order: list[int] = field(default_factory=list)  # category ids in task order (overrides the order of `tasks`)
    category_key: str = "category"  # the annotation field holding each record's category id
    eval_split: str = "val"  # after task t, evaluate on the union of this split's files of tasks 0..t
    eval_gallery: str = "seen"  # seen: tasks 0..t (LPI); all: every task's set each time (fixed gallery)
    oracle_task: bool = False  # give the method the true task at test time (no routing)
    max_tasks: int = 0  # stop after this many tasks (0 = all)
    lr_per_epoch: bool = False  # cosine stepped once per epoch (LPI's CosineAnnealingLR) instead of per step
    task_similarity: str = ""  # LPI's related tasks: "coco", a [T, T] matrix file (> threshold), "" = none
    task_similarity_threshold: float = 0.4


@dataclass
class TTAConfig:
    """``vlprompt tta``: episodic test-time adaptation, one test sample at a time (RLCF, TPT)."""

    steps: int = 3  # adaptation steps per sample (0 = zero-shot)
    lr: float = 7e-3
    weight_decay: float = 5e-4
    eps: float = 1e-8  # AdamW epsilon (the retrieval recipes use 1e-6)
    views: int = 64  # classification: views per image, view 0 = the centre crop
    selection: float = 0.1  # classification: fraction of lowest-entropy views kept
    augmix: bool = False  # classification: AugMix-style views (TPT's fine-grained setting)
    classes: str = ""  # class names: imagenet[-a|-r|-v2|-sketch], cifar100, a file under data.root, "" = folders
    max_samples: int = 0  # adapt on the first N samples of the (seeded) order; 0 = all
    shuffle: bool = True  # seeded sample order (only the momentum variant depends on it)
    momentum: bool = False  # RLCF-S-M: momentum average of the tuned weights becomes the next start point
    momentum_m: float = 0.9998
    momentum_every: int = 64  # F: samples between refreshes of the start point
    momentum_weight: float = 1.0  # w: start = (1 - w) * initial + w * momentum average
    autocast: str = "none"  # none | bf16


@dataclass
class CILConfig:
    """Class-incremental classification: ``vlprompt continual`` with a class-incremental method (itprompt, l2p_cil,
    dualprompt, coda_prompt, hide_prompt, zeroshot_cil); train.* applies to each task."""

    num_tasks: int = 10  # tasks of a generated split (ignored when `tasks` names a split file)
    tasks: str = ""  # split file ({"tasks": [[class ids], ...]}) relative to data.root; "" = generate from a seed
    shuffle_classes: bool = True  # generated split: seeded class permutation (False = label order)
    order_seed: int = -1  # seed of that permutation (-1 = the run's seed)
    classes: str = ""  # class names: cifar100, imagenet-r, a file under data.root ("" = the format's own / folders)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # text anchors, averaged
    eval_split: str = "test"  # test | val
    test_fraction: float = 0.2  # ImageNet-R without train/test trees: per-class held-out fraction (CODA's 80/20)
    holdout_seed: int = 0  # seed of that hold-out (fixed across runs, unlike the class order)
    train_transform: str = "train"  # train (augmented views) | eval (deterministic; frozen queries computed once)
    max_train_per_class: int = 0  # keep the first N training images of each class (0 = all)
    max_tasks: int = 0  # stop after this many tasks (0 = all)
    oracle_eval: bool = False  # task-routing methods: also report accuracy with the true task (acc_oracle)


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "zeroshot"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    cil: CILConfig = field(default_factory=CILConfig)
    seed: int = 0
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked against :class:`Config`."""
    schema = OmegaConf.structured(Config)
    layers: list[DictConfig] = [schema]
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        layers.append(OmegaConf.load(path))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise _friendly(err, Config()) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if not cfg.run_name and path is not None:
        cfg.run_name = path.stem
    _check_choices(cfg)
    return cfg


def _check_choices(cfg: Config) -> None:
    choices = {
        "train.optimizer": (cfg.train.optimizer, {"adamw", "sgd"}),
        "train.schedule": (cfg.train.schedule, {"cosine", "constant"}),
        "train.autocast": (cfg.train.autocast, {"none", "bf16", "fp16"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {sorted(allowed)}, got {value!r}")
    if cfg.train.grad_accum < 1:
        raise ConfigError("train.grad_accum must be >= 1")


def options_from_dict(schema: type, values: dict[str, Any], where: str) -> Any:
    """Typed options dataclass from a plain dict; unknown keys and wrong types are :class:`ConfigError`."""
    valid = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {where}; valid options: {', '.join(valid) or '(none)'}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad option for {where}: {getattr(err, 'msg', err)}") from None
    return OmegaConf.to_object(merged)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
