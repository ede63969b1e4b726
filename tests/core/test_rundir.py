"""Run directories: status.json (running / finished / failed), a clean fresh start, where the data resolved, and
`report` never taking a failed folder for a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.config import Config, load_config
from vlprompt.core import train
from vlprompt.core.rundir import prepare_run_dir, read_status, reportable_runs, tracked_run, write_json
from vlprompt.errors import ConfigError, DataError


def _config(tmp_path: Path, name: str = "r") -> Config:
    return load_config(None, [f"out_dir={tmp_path}", f"run_name={name}"])


def test_a_tracked_command_marks_its_folder_finished_or_failed(tmp_path: Path) -> None:
    @tracked_run
    def command(cfg: Config, fail_after_prepare: bool, fail_before: bool = False) -> Path:
        if fail_before:
            raise ConfigError("refused before touching the folder")
        path = prepare_run_dir(cfg)
        assert read_status(path)["status"] == "running"
        if fail_after_prepare:
            raise DataError("the test file is broken")
        return path

    ok = command(_config(tmp_path, "ok"), False)
    assert read_status(ok)["status"] == "finished"
    with pytest.raises(DataError):
        command(_config(tmp_path, "bad"), True)
    status = read_status(tmp_path / "bad")
    assert status["status"] == "failed" and status["error"] == "DataError: the test file is broken"
    # an error before the folder was prepared leaves an existing run alone
    with pytest.raises(ConfigError):
        command(_config(tmp_path, "ok"), False, fail_before=True)
    assert read_status(ok)["status"] == "finished"
    # outside a tracked command no status is written (callers that do not track keep the old layout), and an
    # earlier attempt's status no longer applies to what is written there now
    assert read_status(prepare_run_dir(_config(tmp_path, "untracked"))) is None
    assert read_status(prepare_run_dir(_config(tmp_path, "bad"))) is None


def test_every_command_that_writes_a_run_directory_is_tracked() -> None:
    from vlprompt.runners.cil import run_class_incremental
    from vlprompt.runners.continual import run_continual
    from vlprompt.runners.tta import run_tta

    for command in (train, run_continual, run_class_incremental, run_tta):
        assert getattr(command, "tracks_run_dirs", False), command.__name__


def test_a_fresh_start_removes_an_earlier_attempts_results(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    path = prepare_run_dir(cfg)
    for name in ("metrics.jsonl", "metrics.json", "continual.json"):
        (path / name).write_text("{}\n")
    prepare_run_dir(cfg, resuming=True)
    assert (path / "metrics.jsonl").exists() and (path / "continual.json").exists()
    prepare_run_dir(cfg)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "env.json"]


def test_reportable_runs_skip_failed_and_unfinished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = {}
    for name, status in (("done", "finished"), ("old", None), ("bad", "failed"), ("live", "running")):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        if status:
            write_json(runs[name] / "status.json", {"status": status, "error": "boom" if status == "failed" else None})
    with caplog.at_level(logging.WARNING, logger="vlprompt.core"):
        assert reportable_runs(list(runs.values())) == [runs["done"], runs["old"]]
    assert "bad (failed: boom)" in caplog.text and "live (running, or killed)" in caplog.text
    with pytest.raises(ConfigError, match="none of the given runs finished"):
        reportable_runs([runs["bad"], runs["live"]])


def _emoji_sets(root: Path) -> tuple[Path, Path]:
    """Colour and monochrome renderings of the same twelve file names, with Karpathy files beside each."""
    sets = []
    for mode in ("RGB", "L"):
        folder = root / ("colour" if mode == "RGB" else "mono")
        folder.mkdir()
        records = []
        for i in range(12):
            name = f"emoji_{i:02d}.png"
            Image.new("RGB", (32, 32), ((i * 20) % 255, 200 - i * 10, 40 + i * 15)).convert(mode).save(folder / name)
            records.append({"image": name, "caption": [f"shape number {i}", f"a picture of shape {i}"]})
        (folder / "test.json").write_text(json.dumps(records))
        pairs = [{"image": r["image"], "caption": c} for r in records for c in r["caption"]]
        (folder / "train.json").write_text(json.dumps(pairs))
        sets.append(folder)
    return sets[0], sets[1]


def test_train_colour_test_mono_fails_marked_then_resumes_cleanly(tmp_path: Path) -> None:
    from vlprompt.cli.main import main

    colour, mono = _emoji_sets(tmp_path)
    out = tmp_path / "runs"
    args = ["method.name=coop", "backbone.pretrained=null", f"data.root={colour}", "data.train=train.json",
            f"data.test={mono / 'test.json'}", "train.epochs=1", "train.batch_size=8", f"out_dir={out}",
            "run_name=mono"]  # fmt: skip
    with pytest.raises(DataError, match="images_from"):
        train(load_config(None, args), progress=False)
    run = out / "mono"
    status = read_status(run)
    assert status["status"] == "failed" and "exist both under the image root" in status["error"]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "env.json", "status.json"]
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2  # nothing finished to report

    (run / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')  # as if a crashed attempt had logged
    result = train(load_config(None, [*args, "data.images_from=annotation", "resume=true"]), progress=False)
    assert not (run / "metrics.jsonl").exists()  # nothing to resume: a clean start (this run validates nothing)
    assert read_status(run)["status"] == "finished" and "test" in result
    env = json.loads((run / "env.json").read_text())
    assert env["data"]["test"] == {"annotation": str(mono / "test.json"), "images": str(mono)}
    assert env["data"]["train"]["images"] == str(colour)


def test_a_killed_run_is_marked_failed_and_its_resume_keeps_what_it_logged(tmp_path: Path) -> None:
    from vlprompt.core.trainer import _Interrupt

    colour, _ = _emoji_sets(tmp_path)
    args = ["method.name=coop", "backbone.pretrained=null", f"data.root={colour}", "data.train=train.json",
            "data.val=test.json", "data.test=test.json", "train.epochs=2", "train.batch_size=8",
            f"out_dir={tmp_path / 'runs'}", "run_name=killed"]  # fmt: skip
    with pytest.raises(_Interrupt):  # 3 steps per epoch: killed in epoch 2, after epoch 1's checkpoint
        train(load_config(None, args), progress=False, interrupt_at_step=4)
    run = tmp_path / "runs" / "killed"
    assert read_status(run)["status"] == "failed" and "interrupted at step 4" in read_status(run)["error"]
    train(load_config(None, [*args, "resume=true"]), progress=False)
    assert read_status(run)["status"] == "finished"
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # epoch 1's validation, logged before the kill, is kept
