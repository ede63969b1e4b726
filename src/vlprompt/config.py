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
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "zeroshot"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
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
