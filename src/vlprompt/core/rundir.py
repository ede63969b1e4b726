"""Run directories: resolved config, environment (versions, git SHA, seed, where the data resolved), metrics
files and the run's status.

``status.json`` says what a folder holds: ``running`` from :func:`prepare_run_dir` on, then ``finished``, or
``failed`` with the error when the command raised (:func:`tracked_run` wraps the commands that write run
directories: train, continual, class-incremental, TTA). ``vlprompt report`` skips folders that are not finished
(:func:`reportable_runs`); a folder without ``status.json`` (older runs) is read as before.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vlprompt.config import Config, to_yaml
from vlprompt.errors import ConfigError

log = logging.getLogger("vlprompt.core")

STATUS = "status.json"
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
#: What a run writes as results; a fresh start (nothing to resume) removes an earlier attempt's copies.
RESULT_FILES = ("metrics.jsonl", "metrics.json", "continual.json")

F = TypeVar("F", bound=Callable[..., Any])
# The run directories prepared inside the innermost tracked_run call (None outside any).
_prepared: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("vlprompt_prepared", default=None)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def git_sha() -> str | None:
    """The source tree's commit, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(seed: int) -> dict[str, Any]:
    """Versions and provenance recorded with every run."""
    import numpy
    import open_clip
    import torch

    from vlprompt.version import __version__

    return {
        "vlprompt": __version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "seed": seed,
        "argv": sys.argv,
    }


def run_dir_for(cfg: Config) -> Path:
    """``out_dir/run_name`` (run_name defaults to the method name)."""
    return Path(cfg.out_dir) / (cfg.run_name or str(cfg.method.get("name", "run")))


def prepare_run_dir(cfg: Config, resuming: bool = False) -> Path:
    """Create the run directory and record the resolved config, the environment and where every data split
    resolved (``env.json`` ``data``: annotation files and image roots, absolute).

    Unless ``resuming`` (a checkpoint will be continued), results of an earlier attempt in the folder are removed,
    so a run that failed before its first checkpoint restarts cleanly. Inside :func:`tracked_run` the folder's
    status becomes ``running``; outside one, an earlier status is removed (it described another attempt).
    """
    from vlprompt.data.sources import data_locations

    path = run_dir_for(cfg)
    path.mkdir(parents=True, exist_ok=True)
    if not resuming:
        for name in RESULT_FILES:
            (path / name).unlink(missing_ok=True)
    prepared = _prepared.get()
    if prepared is not None:
        write_status(path, RUNNING)
        prepared.append(path)
    else:  # an untracked writer (e.g. an evaluation record): an earlier attempt's status no longer applies
        (path / STATUS).unlink(missing_ok=True)
    atomic_write_text(path / "config.yaml", to_yaml(cfg))
    write_json(path / "env.json", {**environment(cfg.seed), "data": data_locations(cfg.data)})
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_status(path: Path, status: str, error: str | None = None) -> None:
    """Record a run's status (``running``, ``finished``, ``failed`` with the error) in ``status.json``."""
    record: dict[str, Any] = {"status": status, "time": _now(), "argv": sys.argv}
    if error is not None:
        record["error"] = error
    write_json(path / STATUS, record)


def read_status(path: Path) -> dict[str, Any] | None:
    """A run directory's ``status.json`` (None when it has none, as older runs)."""
    try:
        status = json.loads((Path(path) / STATUS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"status": "unknown", "error": f"unreadable {STATUS}: {err}"}
    return status if isinstance(status, dict) else {"status": "unknown", "error": f"{STATUS} is not an object"}


def tracked_run(fn: F) -> F:
    """Decorate a command that writes run directories: each folder it prepares ends ``finished``, or ``failed``
    with the error if it raises (interrupts included), so no half-written folder passes for a run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        prepared: list[Path] = []
        token = _prepared.set(prepared)
        try:
            result = fn(*args, **kwargs)
        except BaseException as err:
            for path in prepared:
                write_status(path, FAILED, f"{type(err).__name__}: {err}")
            raise
        finally:
            _prepared.reset(token)
        for path in prepared:
            write_status(path, FINISHED)
        return result

    wrapper.tracks_run_dirs = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def reportable_runs(run_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """The run directories that finished (or predate ``status.json``); the others are named in a warning, and if
    none is left that is an error."""
    keep, skipped = [], []
    for run in map(Path, run_dirs):
        status = read_status(run)
        if status is None or status.get("status") == FINISHED:
            keep.append(run)
            continue
        why = str(status.get("status", "unknown"))
        if status.get("error"):
            why += f": {status['error']}"
        elif why == RUNNING:
            why += ", or killed"
        skipped.append(f"{run} ({why})")
    if skipped and not keep:
        raise ConfigError(f"none of the given runs finished: {'; '.join(skipped)}")
    if skipped:
        log.warning("not reported, the run did not finish: %s", "; ".join(skipped))
    return keep


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's per-epoch metrics log."""
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
