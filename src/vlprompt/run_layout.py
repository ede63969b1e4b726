"""Where a run directory keeps what: the read side of its layout, for every layer that reads runs.

A run directory (written by :mod:`vlprompt.core.rundir` and :mod:`vlprompt.core.checkpoint`) holds its resolved
``config.yaml``, ``metrics.json`` once training has finished, and ``checkpoints/step_<N>/`` folders with
``checkpoints/latest`` naming the newest complete one. The backbone reads a fully fine-tuned run's weights from here
(``backbone.pretrained=RUN_DIR``) without depending on the training code above it.
"""

from __future__ import annotations

from pathlib import Path

#: A run directory's resolved config (what marks a folder as a run).
RUN_CONFIG = "config.yaml"
#: What a run writes when its training has finished.
RUN_RESULTS = "metrics.json"
#: A checkpoint's trainable tensors (safetensors).
WEIGHTS = "trainable.safetensors"
#: The loop state's structure and plain values; its presence marks a complete checkpoint folder.
STATE = "loop.json"
#: Pickled loop states of older versions (trainer, continual runner): recognised, never unpickled.
LEGACY_STATES = ("state.pt", "loop.pt")


def has_loop_state(folder: Path) -> bool:
    """Whether ``folder`` holds a loop state, current or from an older version (so a run is not overwritten)."""
    return any((folder / name).exists() for name in (STATE, *LEGACY_STATES))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, if any (an older version's too: its weights are safetensors)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if has_loop_state(path) else None
