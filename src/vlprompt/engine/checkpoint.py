"""Checkpoints: trainable tensors (safetensors) plus optimizer, scheduler, RNG and loop state.

Each checkpoint is a folder ``checkpoints/step_<N>``; the file ``checkpoints/latest`` names the newest
complete one and is replaced atomically, so a kill at any moment leaves a usable checkpoint.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlprompt.engine.rundir import atomic_write_text

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainable(path: Path, module: nn.Module) -> None:
    """Write only the trainable tensors of ``module`` (a method) as safetensors."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.trainable_state_dict().items()}
    save_file(tensors, str(path))


def load_trainable(path: Path, module: nn.Module) -> None:
    """Load tensors written by :func:`save_trainable`; every trainable tensor must be present."""
    tensors = load_file(str(path))
    expected = set(module.trainable_state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the method: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    module.load_state_dict(tensors, strict=False)


def load_reference_checkpoint(path: Path, method: nn.Module) -> None:
    """Start ``method`` from a checkpoint of the method's original code (e.g. an official DGL ``.pth``)."""
    from vlprompt.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"reference checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or not a tensor dict
        raise ConfigError(f"cannot read reference checkpoint {path}: {err}") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        ours = method.import_reference(state)
    except KeyError as err:
        raise ConfigError(f"{path}: {err.args[0]}") from err
    own = method.state_dict()
    if bad := [k for k, v in ours.items() if k not in own or own[k].shape != v.shape]:
        raise ConfigError(f"{path}: tensors do not fit this model (other options or backbone?): {bad[:5]}")
    method.load_state_dict(ours, strict=False)


def save_checkpoint(run_dir: Path, module: nn.Module, loop_state: dict[str, Any], keep: int = 1) -> Path:
    """Write a complete checkpoint, then point ``latest`` at it and prune older ones."""
    root = run_dir / "checkpoints"
    final = root / f"step_{loop_state['step']:08d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trainable(tmp / WEIGHTS, module)
    torch.save({**loop_state, "rng": rng_state()}, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, if any."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


def load_checkpoint(path: Path, module: nn.Module) -> dict[str, Any]:
    """Load trainable tensors into ``module`` and return the loop state (RNG restored by the caller)."""
    load_trainable(path / WEIGHTS, module)
    return torch.load(path / STATE, weights_only=False)
