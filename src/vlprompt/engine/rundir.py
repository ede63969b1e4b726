"""Run directories: resolved config, environment (versions, git SHA, seed) and metrics files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vlprompt.config import Config, to_yaml


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

    import vlprompt

    return {
        "vlprompt": vlprompt.__version__,
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


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory and record the resolved config and environment."""
    path = run_dir_for(cfg)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", to_yaml(cfg))
    write_json(path / "env.json", environment(cfg.seed))
    return path


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's per-epoch metrics log."""
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
