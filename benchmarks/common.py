"""What every benchmark shares: a median timer, peak memory and a description of the machine (JSON-ready)."""

from __future__ import annotations

import importlib.util
import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import vlprompt


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up call (GPU work synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU peak (CPU peak RSS cannot be reset, so CPU figures are per process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, so JSON results of different runs can be compared."""
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vlprompt": vlprompt.__version__,
    }


def emit(report: dict[str, Any], out: Path | None = None) -> None:
    """Print the benchmark's JSON and, with ``out``, also write it there."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def load_golden() -> ModuleType:
    """``tests/methods/golden.py``: the seeded weights and inputs that the golden tests and recorders share."""
    path = Path(__file__).resolve().parents[1] / "tests" / "methods" / "golden.py"
    spec = importlib.util.spec_from_file_location("golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
