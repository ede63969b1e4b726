"""The console script: train, eval, params, list, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlprompt.cli.main import main


def _write_config(path: Path, root: Path, out: Path) -> Path:
    path.write_text(
        "backbone:\n  name: vlprompt-tiny\n  pretrained: null\n"
        "method:\n  name: coop\n  n_ctx: 2\n"
        f"data:\n  root: {root}\n  train: train.json\n  val: val.json\n  test: test.json\n"
        f"train:\n  epochs: 1\n  batch_size: 8\nout_dir: {out}\n"
    )
    return path


def test_train_then_eval_run_dir(image_text_set: Path, tmp_path: Path, capsys) -> None:
    cfg = _write_config(tmp_path / "coop_small.yaml", image_text_set, tmp_path / "runs")
    assert main(["train", str(cfg), "--quiet", "--json", "train.lr=0.01"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["params"]["trainable"] == 2 * 128
    assert main(["eval", str(tmp_path / "runs" / "coop_small"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated == trained["test"]


def test_params_json(image_text_set: Path, tmp_path: Path, capsys) -> None:
    cfg = _write_config(tmp_path / "c.yaml", image_text_set, tmp_path / "runs")
    assert main(["params", str(cfg), "method.n_ctx=8", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["trainable"] == 8 * 128
    assert counts["total"] > counts["trainable"]


def test_list(capsys) -> None:
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for name in ("zeroshot", "finetune", "coop", "vpt", "maple"):
        assert name in out
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32" in out and "vlprompt-tiny" in out
    assert main(["list", "datasets"]) == 0
    assert "karpathy" in capsys.readouterr().out


def test_unknown_key_is_one_line_error(image_text_set: Path, tmp_path: Path, capsys) -> None:
    cfg = _write_config(tmp_path / "c.yaml", image_text_set, tmp_path / "runs")
    assert main(["params", str(cfg), "train.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.learning_rate'" in err and "train.lr" in err
    assert "Traceback" not in err


def test_missing_annotation_file_names_it(tmp_path: Path, capsys) -> None:
    cfg = _write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "runs")
    assert main(["train", str(cfg), "--quiet"]) == 2
    assert "train.json" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "vlprompt", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "metrics" in out.stdout
