"""``vlprompt params`` on class-incremental configs: what the runner trains, per task and over the whole run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt.cli.main import main
from vlprompt.config import load_config
from vlprompt.runners.cil import run_class_incremental

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAST = ["backbone.pretrained=null", "cil.max_tasks=2", "train.epochs=0"]


def _params(capsys, config: Path, *overrides: str) -> dict:
    assert main(["params", str(config), *overrides, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("cil_hide", ["method.layers=[0,1]", "method.length=2", "method.tii_epochs=1", "method.centroids=1",
                   "method.align_epochs=1", "method.align_samples=2"]),
     ("cil_coda", ["method.pool_size=20", "method.layers=[0,1]"])],
)  # fmt: skip
def test_class_incremental_counts_are_what_the_runner_trains(
    small_world: Path, tmp_path: Path, capsys, recipe: str, extra: list[str]
) -> None:
    config = CONFIGS / "world" / f"{recipe}.yaml"
    overrides = [f"data.root={small_world}", *FAST, *extra]
    counts = _params(capsys, config, *overrides)
    cfg = load_config(config, [*overrides, f"out_dir={tmp_path}"])
    runner = run_class_incremental(cfg, progress=False)["params"]
    assert counts["trainable"] == runner["trainable_per_task"] and counts["total"] == runner["total"]
    assert counts["tasks"] == 2 and counts["trainable_per_task"] == [counts["trainable"]] * 2
    # the second task trains its own prompts (HiDe: one prompt; CODA: its components) with the same shared heads
    assert counts["trainable"] < counts["trainable_over_run"] < 2 * counts["trainable"]


def test_hide_recipe_counts_its_heads_and_every_task(capsys) -> None:
    """HiDe on CIFAR-100 (ViT-B/16): per task one prompt (5 layers x 2 x 5 tokens x 768 = 38,400), the cosine
    head (100 x 512) and the TII head; over the run the 9 later tasks' prompts add 9 x 38,400."""
    counts = _params(capsys, CONFIGS / "hide_cifar100_vitb16.yaml")
    assert counts["tasks"] == 10 and counts["trainable"] == 2_532_708
    assert counts["trainable_per_task"] == [2_532_708] * 10
    assert counts["trainable_over_run"] == 2_532_708 + 9 * 38_400


def test_text_output_names_per_task_and_run_counts(small_world: Path, capsys) -> None:
    config = CONFIGS / "world" / "cil_coda.yaml"
    assert main(["params", str(config), f"data.root={small_world}", *FAST, "method.pool_size=20"]) == 0
    out = capsys.readouterr().out
    assert "trainable per task" in out and "(2 tasks" in out and "over the whole run" in out
