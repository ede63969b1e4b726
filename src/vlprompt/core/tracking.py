"""Experiment tracking (``log.report_to``, open_clip's ``--report-to``): a run's numbers also go to TensorBoard and/or
Weights & Biases.

The trainer, the continual runners and the TTA runner hold one :class:`Tracker` and report through three calls:
:meth:`Tracker.log` (scalars at a step of a named axis: optimizer ``step``, continual ``session``, TTA ``samples``),
:meth:`Tracker.matrix` (an accuracy matrix as a table: TensorBoard text, a W&B table) and :meth:`Tracker.close`.
With ``log.report_to`` empty, and on every rank but 0 under DDP, the tracker does nothing and imports nothing.

* TensorBoard: event files under ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``); the resolved config as
  text.
* W&B: project ``log.wandb_project``, run named after the run directory, the resolved config as the run's config;
  the run id is kept in ``RUN_DIR/wandb_run_id.txt`` so ``resume=true`` continues the same W&B run. ``WANDB_MODE``
  (``offline``) and ``WANDB_DIR`` (default: the run directory) are W&B's own settings.

Both packages are optional (``pip install 'vlprompt[track]'``); asking for a missing one is a :class:`ConfigError`
naming the install command, raised when the run starts, before any training.
"""

from __future__ import annotations

import atexit
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlprompt.config import Config, to_yaml
from vlprompt.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite real numbers of ``values``, nested dicts flattened with ``/`` (``{"test": {"t2i/R@1": ..}}`` ->
    ``test/t2i/R@1``); booleans, strings, lists and non-finite numbers are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _require(package: str) -> None:
    try:
        __import__(package)
    except ImportError as err:
        raise ConfigError(
            f"log.report_to includes {package}, but the {package} package is not installed ({err}): "
            f"pip install {package}   (or pip install 'vlprompt[track]' for TensorBoard and W&B)"
        ) from err


def _markdown_table(matrix: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str]) -> str:
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    cell = lambda v: "-" if v is None or not math.isfinite(v) else f"{v:.2f}"  # noqa: E731
    return head + "".join(f"| {r} | " + " | ".join(cell(v) for v in row) + " |\n" for r, row in zip(rows, matrix))


class _TensorBoard:
    """Event files through torch's ``SummaryWriter``."""

    def __init__(self, folder: Path, cfg: Config) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "```", 0)

    def log(self, values: dict[str, float], step: int, axis: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def matrix(self, name: str, matrix, rows, cols, step: int, axis: str) -> None:
        self.writer.add_text(name, _markdown_table(matrix, rows, cols), step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run; every key is plotted against its own axis (``define_metric``), so optimizer steps and continual
    sessions can share a run."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        _require("wandb")
        import wandb

        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if cfg.resume and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            reinit="create_new",
        )
        self.defined: set[str] = set()

    def _define(self, keys: Sequence[str], axis: str) -> None:
        if axis not in self.defined:
            self.run.define_metric(axis)
            self.defined.add(axis)
        for key in keys:
            if key not in self.defined:
                self.run.define_metric(key, step_metric=axis)
                self.defined.add(key)

    def log(self, values: dict[str, float], step: int, axis: str) -> None:
        self._define(list(values), axis)
        self.run.log({**values, axis: step})

    def matrix(self, name: str, matrix, rows, cols, step: int, axis: str) -> None:
        data = [[r, *(None if v is None or not math.isfinite(v) else v for v in row)] for r, row in zip(rows, matrix)]
        self._define([name], axis)
        self.run.log({name: self.wandb.Table(columns=["after", *cols], data=data), axis: step})

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Where a run's numbers go besides its own files; does nothing when no backend is configured."""

    def __init__(self, backends: Sequence[Any] = ()) -> None:
        self.backends = list(backends)

    @property
    def active(self) -> bool:
        """Whether anything receives the numbers (callers may skip computing extras otherwise)."""
        return bool(self.backends)

    def log(self, values: Mapping[str, Any], step: int, axis: str = "step") -> None:
        """Report the numbers of ``values`` (nested dicts flattened, see :func:`scalars`) at ``step`` of ``axis``."""
        numbers = scalars(values)
        if numbers:
            for backend in self.backends:
                backend.log(numbers, step, axis)

    def matrix(
        self,
        name: str,
        matrix: Sequence[Sequence[float | None]],
        rows: Sequence[str],
        cols: Sequence[str],
        step: int,
        axis: str = "step",
    ) -> None:
        """Report a matrix (``matrix[i][j]`` = row ``rows[i]``, column ``cols[j]``; None = no value) as a table."""
        for backend in self.backends:
            backend.matrix(name, matrix, rows, cols, step, axis)

    def close(self) -> None:
        """Flush and close every backend (a W&B run is finished); closing again does nothing."""
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tracker(cfg: Config, run_dir: Path, enabled: bool = True) -> Tracker:
    """The tracker ``cfg.log.report_to`` asks for, writing beside ``run_dir``; an inactive one when ``enabled`` is
    false (ranks other than 0) or nothing is asked for."""
    names = list(cfg.log.report_to) if enabled else []
    backends: list[Any] = []
    try:
        if "tensorboard" in names:
            backends.append(_TensorBoard(run_dir / TENSORBOARD_DIR, cfg))
        if "wandb" in names:
            backends.append(_WandB(run_dir, cfg))
    except BaseException:
        Tracker(backends).close()
        raise
    tracker = Tracker(backends)
    if backends:  # a run that fails part-way still flushes its events and finishes its W&B run
        atexit.register(tracker.close)
    return tracker


class TrainLog:
    """Training losses averaged between reports: :meth:`record` each micro-batch's loss, :meth:`step` after each
    optimizer step reports ``train/loss`` (the mean since the last report) and ``train/lr`` every ``every`` steps and
    at the last one."""

    def __init__(self, tracker: Tracker, every: int) -> None:
        self.tracker, self.every = tracker, every
        self.total, self.count = 0.0, 0

    def record(self, loss: float) -> None:
        """Account one micro-batch's (unscaled) loss."""
        self.total += loss
        self.count += 1

    def step(self, step: int, lr: float, epoch: float, last: bool = False) -> None:
        """After optimizer step ``step`` (1-based): report when due."""
        if not self.tracker.active or not (last or step % self.every == 0) or not self.count:
            return
        self.tracker.log({"train/loss": self.total / self.count, "train/lr": lr, "train/epoch": epoch}, step)
        self.total, self.count = 0.0, 0


def log_session(tracker: Tracker, results: Mapping[str, Any], session: int) -> None:
    """A continual run after session ``session`` (``continual.json`` as :func:`~vlprompt.runners.continual.
    build_results` makes it), on the ``session`` axis: each seen task's cell of every accuracy matrix
    (``task/<metric>/<task>``: one curve per task, its forgetting), the session's overall metrics (``overall/..``)
    and facts (``session/loss``, ``session/steps``, seconds, gallery sizes), the summaries so far (``cl/..``) and
    each matrix as a table (``matrix/<metric>``)."""
    if not tracker.active:
        return
    names = [str(t["name"]).replace("/", "_") for t in results["tasks"]]
    record = results["sessions"][session]
    cells = {
        f"task/{metric}/{names[j]}": value
        for metric, rows in results["matrices"].items()
        for j, value in enumerate(rows[session])
        if value is not None
    }
    tracker.log({**cells, "overall": record["overall"], "session": record["info"], **results["summary"]}, session,
                "session")  # fmt: skip
    rows = [f"after {n}" for n in names[: len(results["sessions"])]]
    for metric, matrix in results["matrices"].items():
        tracker.matrix(f"matrix/{metric}", matrix, rows, names, session, "session")
