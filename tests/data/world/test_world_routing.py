"""benchmarks/world_routing.py: routing accuracy on constructed features, and the script end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


def _module():
    sys.path.insert(0, str(BENCH))  # the benchmarks import their sibling common.py
    try:
        spec = importlib.util.spec_from_file_location("world_routing", BENCH / "world_routing.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_routing_scores_on_separated_clusters() -> None:
    rs = _module().routing_scores
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    train_tasks = torch.arange(3).repeat_interleave(20)
    test_tasks = torch.tensor([0, 1, 2, 2, 1, 0])
    train = centres[train_tasks] + 0.1 * torch.randn(60, 3, generator=g)
    test = centres[test_tasks] + 0.1 * torch.randn(6, 3, generator=g)
    out = rs(train, train_tasks, test, test_tasks, keys=2)
    assert out["1nn"]["accuracy"] == 100.0 and out["kmeans"]["accuracy"] == 100.0
    assert out["chance"] == 33.33 and (out["train_items"], out["test_items"]) == (60, 6)
    wrong = rs(train, train_tasks, test, (test_tasks + 1) % 3, keys=2)  # every test label is another task's
    assert wrong["1nn"]["accuracy"] == 0.0 and wrong["kmeans"]["per_task"] == [0.0, 0.0, 0.0]
    half = rs(train, train_tasks, test, torch.tensor([0, 1, 2, 0, 0, 0]), keys=2)
    assert half["1nn"]["accuracy"] == 66.67 and half["1nn"]["per_task"] == [50.0, 100.0, 100.0]


def test_script_on_the_small_world(small_world: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "world_routing.py"), "--world", str(small_world)],
                          capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    report = json.loads(done.stdout)
    assert report["benchmark"] == "world_routing" and report["world"]["size"] == "small"
    cont = report["continual"]
    assert cont["image"]["train_items"] == 6 * 4 and cont["image"]["test_items"] == 6 * 3
    assert cont["text"]["train_items"] == 6 * 4 * 5 and len(cont["image"]["1nn"]["per_task"]) == 6
    assert set(report["grounding"]) == {"test", "test_sketch", "test_noisy", "test_blurred", "test_low_contrast",
                                        "test_textured"}  # fmt: skip
    for scores in [cont["image"], cont["text"], *report["grounding"].values()]:
        for rule in ("1nn", "kmeans"):
            assert 0.0 <= scores[rule]["accuracy"] <= 100.0
