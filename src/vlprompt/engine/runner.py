"""Evaluate what the user points at: a run directory (config + checkpoint) or a config."""

from __future__ import annotations

from pathlib import Path

from vlprompt.config import load_config
from vlprompt.data import load_gallery
from vlprompt.engine.checkpoint import latest_checkpoint, load_trainable
from vlprompt.engine.evaluate import evaluate_retrieval
from vlprompt.engine.trainer import build_model, data_path, resolve_device, seed_everything
from vlprompt.errors import ConfigError


def evaluate_target(target: str | Path, overrides: list[str] | None = None, split: str = "test") -> dict[str, float]:
    """Retrieval metrics of a run directory's latest checkpoint, or of a config's untrained method."""
    target = Path(target)
    run_dir = target if target.is_dir() else None
    cfg = load_config(target / "config.yaml" if run_dir else target, overrides)
    seed_everything(cfg.seed)
    method = build_model(cfg, resolve_device(cfg.device))
    if run_dir is not None:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None and method.trainable_parameters():
            raise ConfigError(f"{run_dir} has no checkpoint to evaluate")
        if checkpoint is not None:
            load_trainable(checkpoint / "trainable.safetensors", method)
    ann = getattr(cfg.data, split)
    if not ann:
        raise ConfigError(f"data.{split} is empty: nothing to evaluate (override it, e.g. data.{split}=FILE)")
    gallery = load_gallery(data_path(cfg, ann), cfg.data.root, strict=cfg.data.strict)
    return evaluate_retrieval(
        method, gallery, method.backbone.preprocess_val, cfg.train.eval_batch_size, cfg.train.autocast
    )
