"""Evaluating a run directory or a config, and recording the evaluation as a run directory that `report` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlprompt.config import load_config
from vlprompt.core import train
from vlprompt.core.rundir import read_status
from vlprompt.errors import ConfigError
from vlprompt.reports.runs import load_run, write_run_report
from vlprompt.runners.eval_run import EVALUATED, evaluate_target


def _config(tmp_path: Path, root: Path, method: str) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(
        f"backbone: {{name: vlprompt-tiny, pretrained: null}}\nmethod: {{name: {method}}}\n"
        f"data: {{root: {root}, train: train.json, test: test.json}}\n"
        f"train: {{epochs: 1, batch_size: 8, eval_every: 0}}\nout_dir: {tmp_path / 'runs'}\n"
    )
    return path


def test_a_zero_shot_evaluation_becomes_a_run_directory(image_text_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "zeroshot"
    metrics = evaluate_target(_config(tmp_path, image_text_set, "zeroshot"), ["seed=3"], out=out)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "env.json", "metrics.json"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == metrics and saved["params"]["trainable"] == 0  # a training run's schema
    assert saved[EVALUATED]["target"].endswith("zeroshot.yaml") and saved[EVALUATED]["checkpoint"] is None
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["name"] == "zeroshot" and config["seed"] == 3 and config["run_name"] == "zeroshot"
    assert json.loads((out / "env.json").read_text())["seed"] == 3
    assert read_status(out)["status"] == "finished"  # written once the evaluation succeeded
    # `report` reads it like any other run, beside a trained one
    run = load_run(out)
    assert run.kind == "eval" and run.method == "zeroshot" and run.metrics["t2i/R@1"] == pytest.approx(
        metrics["t2i/R@1"])  # fmt: skip
    trained = train(load_config(_config(tmp_path, image_text_set, "coop")), progress=False)
    page = write_run_report([out, tmp_path / "runs" / "coop"], tmp_path / "report.html").read_text()
    assert "zeroshot" in page and "coop" in page
    assert trained["params"]["trainable"] > 0
    # evaluating again into the same folder replaces that evaluation
    evaluate_target(_config(tmp_path, image_text_set, "zeroshot"), out=out)
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0


def test_evaluating_a_trained_run_records_its_checkpoint(image_text_set: Path, tmp_path: Path) -> None:
    result = train(load_config(_config(tmp_path, image_text_set, "coop")), progress=False)
    run = tmp_path / "runs" / "coop"
    out = tmp_path / "evals" / "coop_test"
    assert evaluate_target(run, out=out) == pytest.approx(result["test"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["params"] == result["params"] and "checkpoints" in saved[EVALUATED]["checkpoint"]


def test_out_never_overwrites_a_training_run(image_text_set: Path, tmp_path: Path) -> None:
    train(load_config(_config(tmp_path, image_text_set, "coop")), progress=False)
    run = tmp_path / "runs" / "coop"
    before = (run / "metrics.json").read_text()
    zeroshot = _config(tmp_path, image_text_set, "zeroshot")
    with pytest.raises(ConfigError, match="already holds a run that is not an evaluation"):
        evaluate_target(zeroshot, out=run)
    with pytest.raises(ConfigError, match="is the evaluated run directory itself"):
        evaluate_target(run, out=run)
    assert (run / "metrics.json").read_text() == before
