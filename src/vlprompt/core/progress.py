"""Progress display for training: a rich bar with loss, learning rate and throughput."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager showing optimizer steps; quiet when disabled (tests, non-rank-0 processes)."""

    def __init__(self, total_steps: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total_steps, info="")
        self._loss: float | None = None
        self._samples = 0
        self._t0 = time.perf_counter()

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def advance_to(self, step: int) -> None:
        """Start the bar at ``step`` (resumed runs)."""
        self.progress.update(self.task, completed=step)

    def record(self, loss: float, samples: int) -> None:
        """Account one micro-batch (exponential moving average of the loss)."""
        self._loss = loss if self._loss is None else 0.9 * self._loss + 0.1 * loss
        self._samples += samples

    def step(self, step: int, lr: float) -> None:
        """Show an optimizer step."""
        rate = self._samples / max(time.perf_counter() - self._t0, 1e-9)
        loss = f"{self._loss:.4f}" if self._loss is not None else "-"
        self.progress.update(self.task, completed=step, info=f"loss {loss}  lr {lr:.2e}  {rate:.1f} samples/s")

    def log(self, message: str) -> None:
        """Print a line above the bar."""
        if self.enabled:
            self.progress.console.print(message)
