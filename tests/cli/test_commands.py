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
    assert main(["params", str(cfg), "method.n_ctx=8", "--json"]) == 2  # longer than the recipe's init phrase
    assert "method.ctx_init=''" in capsys.readouterr().err
    assert main(["params", str(cfg), "method.n_ctx=8", "method.ctx_init=''", "--json"]) == 0
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


def test_pretrain_a_config_then_use_the_run_as_a_backbone(image_text_set: Path, tmp_path: Path, capsys) -> None:
    prompt_cfg = _write_config(tmp_path / "coop.yaml", image_text_set, tmp_path / "runs")
    cfg = tmp_path / "full.yaml"
    cfg.write_text(prompt_cfg.read_text().replace("name: coop\n  n_ctx: 2", "name: finetune"))
    export = tmp_path / "full.safetensors"
    assert main(["pretrain", str(cfg), "data.val=", "--export", str(export), "--quiet"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "full"
    assert f"backbone.pretrained={run}" in out and export.is_file()
    # the run directory and the exported file are the same backbone for the next (prompt) run
    for pretrained in (run, export):
        assert main(["params", str(prompt_cfg), f"backbone.pretrained={pretrained}", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["trainable"] == 2 * 128


def test_pretrain_takes_a_config_or_the_world(tmp_path: Path, capsys) -> None:
    assert main(["pretrain"]) == 2
    assert "give either a CONFIG" in capsys.readouterr().err
    assert main(["pretrain", "c.yaml", "--world", str(tmp_path)]) == 2
    assert "give either a CONFIG" in capsys.readouterr().err


def test_pretrain_the_embedded_model_on_the_world(small_world: Path, tmp_path: Path, capsys) -> None:
    args = ["pretrain", "--model", "vlprompt-tiny", "--world", str(small_world), "--steps", "2", "--batch-size", "16",
            "--out", str(tmp_path / "models"), "--runs", str(tmp_path / "runs"), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "models" / "vlprompt-tiny.safetensors").is_file()
    assert "test_sketch" in capsys.readouterr().out


def test_eval_out_writes_a_run_directory_that_report_reads(image_text_set: Path, tmp_path: Path, capsys) -> None:
    cfg = _write_config(tmp_path / "zs.yaml", image_text_set, tmp_path / "runs")
    out = tmp_path / "runs" / "zeroshot"
    cfg.write_text(cfg.read_text().replace("name: coop\n  n_ctx: 2", "name: zeroshot"))
    assert main(["eval", str(cfg), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "metrics.json").read_text())["test"] == printed
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0
    assert "zeroshot" in (tmp_path / "report.html").read_text()
