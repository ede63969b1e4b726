"""Evaluate what the user points at: a run directory (config + checkpoint) or a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlprompt.config import load_config
from vlprompt.data.sources import eval_set
from vlprompt.engine.checkpoint import latest_checkpoint, load_trainable
from vlprompt.engine.evaluate import evaluate_retrieval, gallery_relevance
from vlprompt.engine.trainer import build_model, resolve_device, seed_everything, visual_spec
from vlprompt.errors import ConfigError


def evaluate_target(
    target: str | Path,
    overrides: list[str] | None = None,
    split: str = "test",
    protocol: str = "cross-modal",
    relevance: str | Path | None = None,
    official_ndcg: bool = False,
) -> dict[str, float]:
    """Retrieval metrics of a run directory's latest checkpoint, or of a config's untrained method.

    ``protocol`` and ``official_ndcg`` as in :func:`~vlprompt.engine.evaluate.evaluate_retrieval`; ``relevance`` is
    a ``.npy`` ROUGE-L relevance file for the gallery, loaded when it exists and written there when computed.
    """
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
    rel = relevance_file(gallery, relevance) if relevance and protocol != "cross-modal" else None
    batch, autocast = cfg.train.eval_batch_size, cfg.train.autocast
    return evaluate_retrieval(
        method, gallery, batch, autocast, protocol=protocol, relevance=rel, official_ndcg=official_ndcg
    )


def relevance_file(gallery, path: str | Path) -> np.ndarray:
    """The gallery's ROUGE-L relevance from ``path`` (``.npy``), computed and saved there when missing."""
    path = Path(path)
    shape = (len(gallery.captions), gallery.num_visual)
    if path.is_file():
        rel = np.load(path)
        if rel.shape != shape:
            raise ConfigError(f"relevance file {path} has shape {rel.shape}; this gallery needs {shape}")
        return rel
    rel = gallery_relevance(gallery)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, rel)
    tmp.replace(path)
    return rel
