"""End-to-end training on a small generated image-text set: CoOp trains, evaluates, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlprompt.config import load_config
from vlprompt.core import train
from vlprompt.core.trainer import _Interrupt, epoch_order
from vlprompt.errors import ConfigError
from vlprompt.run_layout import latest_checkpoint
from vlprompt.runners.eval_run import evaluate_target


def _cfg(root: Path, out: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            "method.name=coop",
            "backbone.pretrained=null",
            f"data.root={root}",
            "data.train=train.json",
            "data.val=val.json",
            "data.test=test.json",
            "train.epochs=2",
            "train.batch_size=8",
            "train.lr=0.05",
            f"out_dir={out}",
            f"run_name={name}",
            *extra,
        ],
    )


def test_coop_trains_and_evaluates(image_text_set: Path, tmp_path: Path) -> None:
    result = train(_cfg(image_text_set, tmp_path, "coop"), progress=False)
    run = tmp_path / "coop"
    assert result["params"]["trainable"] == 4 * 128  # n_ctx x text width of vlprompt-tiny
    assert result["steps"] == 2 * (24 // 8)
    assert set(result["test"]) >= {"t2i/R@1", "i2t/R@10", "rsum"}
    assert 0 <= result["test"]["t2i/R@1"] <= 100
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test"] == result["test"]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert {"git_sha", "torch", "seed"} <= set(json.loads((run / "env.json").read_text()))
    assert "coop" in (run / "config.yaml").read_text()
    # evaluating the run directory reloads the checkpoint and gives the same test metrics
    assert evaluate_target(run) == pytest.approx(result["test"])


def test_prompts_change_and_backbone_stays(image_text_set: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_text_set, tmp_path, "frozen", "train.epochs=1")
    result = train(cfg, progress=False)
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(tmp_path / "frozen")
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    assert list(tensors) == ["context.ctx"]
    assert result["steps"] == 3


def test_resume_after_kill_matches_uninterrupted(image_text_set: Path, tmp_path: Path) -> None:
    full = train(_cfg(image_text_set, tmp_path, "full", "train.checkpoint_every=2"), progress=False)
    with pytest.raises(_Interrupt):
        train(
            _cfg(image_text_set, tmp_path, "killed", "train.checkpoint_every=2"), progress=False, interrupt_at_step=5
        )
    assert latest_checkpoint(tmp_path / "killed").name == "step_00000004"
    saved = sorted(p.name for p in latest_checkpoint(tmp_path / "killed").iterdir())
    assert saved == ["loop.json", "loop.safetensors", "trainable.safetensors"]  # no pickle anywhere
    with pytest.raises(ConfigError, match="resume=true"):
        train(_cfg(image_text_set, tmp_path, "killed", "train.checkpoint_every=2"), progress=False)
    resumed = train(
        _cfg(image_text_set, tmp_path, "killed", "train.checkpoint_every=2", "resume=true"), progress=False
    )
    assert resumed["steps"] == full["steps"]
    assert resumed["test"] == full["test"]
    assert resumed["val"] == full["val"]


def test_an_older_pickled_run_directory_is_kept_and_refused(image_text_set: Path, tmp_path: Path) -> None:
    # A run directory of an older vlprompt: its loop state is a pickle (here planted to touch a marker).
    class Planted:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    step = tmp_path / "old" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    torch.save({"step": 2, "rng": Planted()}, step / "state.pt")
    (step.parent / "latest").write_text(step.name + "\n")
    with pytest.raises(ConfigError, match="resume=true"):  # recognised as a run: not overwritten
        train(_cfg(image_text_set, tmp_path, "old"), progress=False)
    with pytest.raises(ConfigError, match=r"state.pt: this run directory was written by an older vlprompt"):
        train(_cfg(image_text_set, tmp_path, "old", "resume=true"), progress=False)
    assert not (tmp_path / "ran").exists()


def test_epoch_order_is_reproducible() -> None:
    assert epoch_order(50, 3, 1) == epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 1) != epoch_order(50, 3, 2)
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))


def test_grad_accumulation_and_sgd_run(image_text_set: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        image_text_set,
        tmp_path,
        "accum",
        "train.grad_accum=3",
        "train.optimizer=sgd",
        "train.warmup_steps=1",
        "train.batch_size=4",
        "train.epochs=1",
    )
    result = train(cfg, progress=False)
    assert result["steps"] == (24 // 4) // 3


def test_bf16_autocast_runs(image_text_set: Path, tmp_path: Path) -> None:
    result = train(_cfg(image_text_set, tmp_path, "bf16", "train.autocast=bf16", "train.epochs=1"), progress=False)
    assert torch.isfinite(torch.tensor(result["test"]["rsum"]))


def test_nothing_to_train_is_a_clear_error(image_text_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to train"):
        train(_cfg(image_text_set, tmp_path, "zs", "method.name=zeroshot"), progress=False)


def test_video_training_on_msrvtt_layout(small_world: Path, tmp_path: Path) -> None:
    video = small_world / "video"
    cfg = load_config(
        None,
        [
            "method.name=vpt",
            "method.n_tokens=2",
            "backbone.pretrained=null",
            "data.format=msrvtt",
            f"data.root={video}",
            "data.train=default",
            "data.val=val.csv",
            "data.test=default",
            "data.num_frames=4",
            "data.order_pairs=reversed_pairs.json",
            "train.epochs=1",
            "train.batch_size=8",
            f"out_dir={tmp_path}",
            "run_name=video",
        ],
    )
    result = train(cfg, progress=False)
    assert result["steps"] >= 1
    assert {"t2v/R@1", "v2t/R@1", "rsum", "t2v/order_acc"} <= set(result["test"])
    assert 0 <= result["test"]["t2v/order_acc"] <= 100
    assert evaluate_target(tmp_path / "video") == pytest.approx(result["test"])


@pytest.mark.parametrize("content", [None, "[{\"image\": \"images/x.png\"", "[{\"image\": \"images/x.png\"}]"],
                         ids=["missing", "truncated_json", "record_without_caption"])  # fmt: skip
def test_a_bad_test_file_fails_before_the_first_step(
    image_text_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None
) -> None:
    from vlprompt.core import trainer
    from vlprompt.errors import DataError

    bad = tmp_path / "bad_test.json"  # absolute, so data.root does not apply
    if content is not None:
        bad.write_text(content)
    steps: list[int] = []
    monkeypatch.setattr(trainer, "optimizer_step", lambda *args: steps.append(1))
    with pytest.raises(DataError, match=str(bad)):
        train(_cfg(image_text_set, tmp_path, "badtest", f"data.test={bad}"), progress=False)
    assert steps == []  # no optimizer step ran ...
    assert latest_checkpoint(tmp_path / "badtest") is None  # ... no checkpoint was written ...
    assert not (tmp_path / "badtest" / "metrics.jsonl").exists()  # ... and no epoch was validated


def test_bad_config_values_stop_train_before_any_work(image_text_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^train\.batch_size = 0: must be an integer >= 1$"):
        train(_cfg(image_text_set, tmp_path, "zero_batch", "train.batch_size=0"), progress=False)
    assert not (tmp_path / "zero_batch").exists()


@pytest.mark.parametrize("eval_every", [0, 1])
def test_validation_file_is_read_only_when_the_run_validates(
    image_text_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eval_every: int
) -> None:
    from vlprompt.core import trainer
    from vlprompt.errors import DataError

    steps: list[int] = []
    real_step = trainer.optimizer_step
    monkeypatch.setattr(trainer, "optimizer_step", lambda *args: (steps.append(1), real_step(*args)))
    # a template's validation file that this dataset does not have
    cfg = _cfg(image_text_set, tmp_path, f"noval{eval_every}", "data.val=no_such_val.json", "train.epochs=1",
               f"train.eval_every={eval_every}")  # fmt: skip
    if eval_every:  # validating reads it: an error before the first step
        with pytest.raises(DataError, match="no_such_val.json"):
            train(cfg, progress=False)
        assert steps == []
        return
    result = train(cfg, progress=False)  # eval_every=0: never validated, so never read
    assert steps and "val" not in result and "t2i/R@1" in result["test"]
    assert not (tmp_path / "noval0" / "metrics.jsonl").exists()


def test_eval_every_at_least_epochs_validates_once_at_the_end(image_text_set: Path, tmp_path: Path) -> None:
    result = train(_cfg(image_text_set, tmp_path, "endval", "train.eval_every=2"), progress=False)
    epochs = [json.loads(line) for line in (tmp_path / "endval" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [2] and "t2i/R@1" in result["val"]
