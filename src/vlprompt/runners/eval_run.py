"""Evaluate what the user points at: a run directory (config + checkpoint) or a config; optionally record the
evaluation as a run directory of its own (a zero-shot baseline that ``vlprompt report`` compares with trained runs)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlprompt.config import Config, load_config
from vlprompt.core.evaluate import evaluate_retrieval, gallery_relevance
from vlprompt.core.factory import build_model, resolve_device, seed_everything, visual_spec
from vlprompt.core.hub import load_trained, resolve_trained
from vlprompt.core.rundir import FINISHED, prepare_run_dir, write_json, write_status
from vlprompt.data.sources import eval_set
from vlprompt.errors import ConfigError


def evaluate_target(
    target: str | Path,
    overrides: list[str] | None = None,
    split: str = "test",
    protocol: str = "cross-modal",
    relevance: str | Path | None = None,
    official_ndcg: bool = False,
    out: str | Path | None = None,
) -> dict[str, float]:
    """Retrieval metrics of a run directory's latest checkpoint, an exported folder or ``hf-hub:ORG/NAME``
    (:func:`vlprompt.core.hub.resolve_trained`), or of a config's untrained method.

    ``protocol`` and ``official_ndcg`` as in :func:`~vlprompt.core.evaluate.evaluate_retrieval`; ``relevance`` is
    a ``.npy`` ROUGE-L relevance file for the gallery, loaded when it exists and written there when computed.
    ``out``: also write a run directory there (:func:`record_evaluation`).
    """
    source = str(target)
    trained = resolve_trained(target)  # a run directory, an exported folder or hf-hub:ORG/NAME; None: a config
    target = trained.folder if trained is not None else Path(target)
    if out is not None:
        check_eval_out(Path(out), target)  # before the work, not after it
    start = time.perf_counter()
    checkpoint = trained.checkpoint if trained is not None else None
    if trained is not None:
        method, cfg = load_trained(trained, overrides or ())
    else:
        cfg = load_config(target / "config.yaml" if target.is_dir() else target, overrides)
        seed_everything(cfg.seed)
        method = build_model(cfg, resolve_device(cfg.device))
    gallery = eval_set(cfg.data, split, visual_spec(method.backbone))
    if gallery is None:
        raise ConfigError(f"data.{split} is empty: nothing to evaluate (override it, e.g. data.{split}=FILE)")
    rel = relevance_file(gallery, relevance) if relevance and protocol != "cross-modal" else None
    batch, autocast = cfg.train.eval_batch_size, cfg.train.autocast
    metrics = evaluate_retrieval(
        method, gallery, batch, autocast, protocol=protocol, relevance=rel, official_ndcg=official_ndcg
    )
    if out is not None:
        evaluated = {"target": source, "checkpoint": str(checkpoint) if checkpoint else None,
                     "protocol": protocol, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        record_evaluation(Path(out), cfg, {"params": method.parameter_counts(), split: metrics}, evaluated)
    return metrics


#: The key of an evaluation run's ``metrics.json`` that says what was evaluated (and marks it as such).
EVALUATED = "evaluated"


def check_eval_out(out: Path, target: Path) -> None:
    """Refuse an ``--out`` folder that holds a run of another kind (or is the evaluated run): never overwrite one."""
    if target.is_dir() and out.resolve() == target.resolve():
        raise ConfigError(f"--out {out} is the evaluated run directory itself; give a new folder")
    metrics = out / "metrics.json"
    trained = (out / "checkpoints").exists() or (out / "continual.json").exists()
    if trained or (metrics.is_file() and EVALUATED not in _json_or_empty(metrics)):
        raise ConfigError(f"--out {out} already holds a run that is not an evaluation; give a new folder")


def _json_or_empty(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record_evaluation(out: Path, cfg: Config, metrics: dict[str, Any], evaluated: dict[str, Any]) -> Path:
    """Write ``out`` as a run directory: the resolved ``config.yaml``, ``env.json`` and ``metrics.json`` holding
    ``{"params": ..., "<split>": {...}}`` as a training run does, plus :data:`EVALUATED` (what was evaluated, how)."""
    cfg.out_dir, cfg.run_name = str(out.parent), out.name  # the config says where its run directory is
    prepare_run_dir(cfg)
    write_json(out / "metrics.json", {**metrics, EVALUATED: evaluated})
    write_status(out, FINISHED)  # written only once the evaluation succeeded
    return out


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
