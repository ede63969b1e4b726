"""Checkpoints: trainable tensors (safetensors) plus optimizer, scheduler, RNG and loop state.

Each checkpoint is a folder ``checkpoints/step_<N>``; the file ``checkpoints/latest`` names the newest
complete one and is replaced atomically, so a kill at any moment leaves a usable checkpoint.

Nothing here is a pickle, so reading a copied run directory cannot run code: the loop state (optimizer,
scheduler, scaler, RNG states, counters) is split by :func:`flatten_state` into ``loop.json`` (structure and
plain values, tensors by name) and ``loop.safetensors`` (the tensors). Run directories of older vlprompt
versions hold a pickled ``state.pt`` / ``loop.pt``; they can still be evaluated (only safetensors are read), but
resuming them is refused with a message. The layout's read side (file names, the latest complete checkpoint) is
:mod:`vlprompt.run_layout`, which the backbone uses too.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlprompt.core.rundir import atomic_write_text
from vlprompt.errors import ConfigError
from vlprompt.run_layout import LEGACY_STATES, STATE, WEIGHTS
from vlprompt.safe_pickle import load_torch_tensors

#: The loop state's tensors, named in :data:`~vlprompt.run_layout.STATE`.
STATE_TENSORS = "loop.safetensors"
_FORMAT = "vlprompt-loop-state/1"
# JSON objects keyed by one of these stand for a value JSON lacks; a dict with such a key is stored as items.
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


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
    if not path.is_file():
        raise ConfigError(f"reference checkpoint not found: {path}")
    state = load_torch_tensors(path, "reference checkpoint")  # tensors and plain values only, never code
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        ours = method.import_reference(state)
    except KeyError as err:
        raise ConfigError(f"{path}: {err.args[0]}") from err
    own = method.state_dict()
    if bad := [k for k, v in ours.items() if k not in own or own[k].shape != v.shape]:
        raise ConfigError(f"{path}: tensors do not fit this model (other options or backbone?): {bad[:5]}")
    method.load_state_dict(ours, strict=False)


def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state (dicts, lists, tuples, tensors, numpy arrays, scalars) into JSON and named tensors.

    Tuples, non-string dict keys (an optimizer's parameter ids) and numpy arrays survive the round trip through
    :func:`unflatten_state` with their types, so ``random.setstate`` and ``optimizer.load_state_dict`` accept
    the result. Tensors are copied to the CPU; any other type is a ``TypeError`` at save time, not a surprise at
    resume time.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic) and not isinstance(value, np.object_):
            return value.item()
        if isinstance(value, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": name}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"loop state {where}: object arrays cannot be stored")
            name = str(len(tensors))  # raw bytes: every numpy dtype (uint32 RNG keys too) without a torch twin
            tensors[name] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8).copy())
            return {"__ndarray__": name, "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in value):
                return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
            return {"__items__": [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        raise TypeError(f"loop state {where}: cannot store a {type(value).__name__}")

    return encode(state, "state"), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild what :func:`flatten_state` split; a damaged tree is a ``ValueError`` saying where."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            return _named(value["__tensor__"])
        if "__ndarray__" in value:
            if not re.fullmatch(r"[<>|=]?[biuf]\d{1,2}", str(value["dtype"])):  # plain numbers only (RNG keys)
                raise ValueError(f"array dtype {value['dtype']!r} is not a plain number type")
            dtype = np.dtype(value["dtype"])
            raw = _named(value["__ndarray__"]).numpy().tobytes()
            return np.frombuffer(raw, dtype).reshape([int(n) for n in value["shape"]]).copy()
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        if "__items__" in value:
            return {_hashable(decode(k)): decode(v) for k, v in value["__items__"]}
        return {k: decode(v) for k, v in value.items()}

    def _named(name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"names tensor {name!r}, which the tensor file lacks")
        return tensors[name]

    def _hashable(key: Any) -> Any:
        if isinstance(key, (list, dict)):
            raise ValueError(f"a dict key cannot be a {type(key).__name__}")
        return key

    return decode(tree)


def save_loop_state(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as :data:`STATE` (JSON) + :data:`STATE_TENSORS` (safetensors) into ``folder``."""
    tree, tensors = flatten_state(state)
    save_file(tensors, str(folder / STATE_TENSORS))
    # Python's json writes inf/nan (a GradScaler may hold inf) as Infinity/NaN and reads them back exactly
    (folder / STATE).write_text(json.dumps({"format": _FORMAT, "state": tree}))


def load_loop_state(folder: Path) -> dict[str, Any]:
    """Read what :func:`save_loop_state` wrote; an older version's pickle is refused, never unpickled."""
    path = folder / STATE
    if not path.exists():
        legacy = next((folder / n for n in LEGACY_STATES if (folder / n).exists()), None)
        if legacy is not None:
            raise ConfigError(
                f"{legacy}: this run directory was written by an older vlprompt whose loop state is a pickle, which "
                "vlprompt no longer reads (unpickling a copied file can run code). Its trained weights can still be "
                "evaluated (`vlprompt eval RUN_DIR`); to train, start a new run (another run_name)"
            )
        raise ConfigError(f"{folder} is not a complete checkpoint: {STATE} is missing")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} file")
        state = unflatten_state(saved["state"], load_file(str(folder / STATE_TENSORS)))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as err:
        raise ConfigError(f"{path}: damaged loop state ({err}); resume from another checkpoint or start anew") from err
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: damaged loop state (not a dict)")
    return state


def save_checkpoint(run_dir: Path, module: nn.Module, loop_state: dict[str, Any], keep: int = 1) -> Path:
    """Write a complete checkpoint, then point ``latest`` at it and prune older ones."""
    root = run_dir / "checkpoints"
    final = root / f"step_{loop_state['step']:08d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trainable(tmp / WEIGHTS, module)
    save_loop_state(tmp, {**loop_state, "rng": rng_state()})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, module: nn.Module) -> dict[str, Any]:
    """Load trainable tensors into ``module`` and return the loop state (RNG restored by the caller)."""
    state = load_loop_state(path)  # first: an unreadable state must not leave the module half-loaded
    load_trainable(path / WEIGHTS, module)
    return state
