"""Evaluate what the user points at: a run directory (config + checkpoint) or a config."""

from __future__ import annotations

from pathlib import Path

from vlprompt.config import load_config
from vlprompt.data.sources import eval_set
from vlprompt.engine.checkpoint import latest_checkpoint, load_trainable
from vlprompt.engine.evaluate import evaluate_retrieval
from vlprompt.engine.trainer import build_model, resolve_device, seed_everything, visual_spec
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
    gallery = eval_set(cfg.data, split, visual_spec(method.backbone))
    if gallery is None:
        raise ConfigError(f"data.{split} is empty: nothing to evaluate (override it, e.g. data.{split}=FILE)")
    return evaluate_retrieval(method, gallery, cfg.train.eval_batch_size, cfg.train.autocast)
