"""``vlprompt continual``: a config run prints the summary; --build-coco writes the split; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

from vlprompt.cli.main import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "world"


def test_continual_command_json(small_world: Path, tmp_path: Path, capsys):
    args = ["continual", str(CONFIGS / "continual_zeroshot.yaml"), f"data.root={small_world}", f"out_dir={tmp_path}",
            "backbone.pretrained=null", "continual.max_tasks=2", "--json", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["params"]["trainable_per_task"] == 0 and "cl/i2t/R@1/forgetting" in out["summary"]
    assert (tmp_path / "continual_zeroshot" / "continual.json").exists()
    assert main(args[:-2] + ["--quiet"]) == 2  # the run exists and resume is off: one-line error
    assert "resume=true" in capsys.readouterr().err


def test_build_coco_needs_annotations(tmp_path: Path, capsys):
    assert main(["continual", "--build-coco", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
