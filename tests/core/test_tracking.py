"""Experiment tracking (``log.report_to``): the config key, TensorBoard event files read back, W&B offline runs,
the continual and TTA hooks, clear errors for missing packages, and nothing at all when tracking is off."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from runners.test_tta import RandomImages, SampleViews, _cfg, _method, _views
from vlprompt.backbone import embedded_weights_path
from vlprompt.config import load_config
from vlprompt.core import train
from vlprompt.core.tracking import TENSORBOARD_DIR, WANDB_ID_FILE, Tracker, TrainLog, open_tracker, scalars
from vlprompt.errors import ConfigError
from vlprompt.runners.continual import SessionResult, run_task_sequence
from vlprompt.runners.tta import adaptation_gain, run_classification

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

WORLD = Path(__file__).resolve().parents[2] / "configs" / "world"


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _train_cfg(root: Path, out: Path, name: str, *extra: str):
    return load_config(None, [
        "method.name=coop", "backbone.pretrained=null", f"data.root={root}", "data.train=train.json",
        "data.val=val.json", "data.test=test.json", "train.epochs=2", "train.batch_size=8", "train.lr=0.05",
        f"out_dir={out}", f"run_name={name}", *extra,
    ])  # fmt: skip


# ---- the config key ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [("tensorboard,wandb", ["tensorboard", "wandb"]), ('"tensorboard, wandb"', ["tensorboard", "wandb"]),
     ("[wandb]", ["wandb"]), ("none", []), ("", [])],  # fmt: skip
)
def test_report_to_takes_a_list_or_a_comma_string(value: str, expected: list[str]) -> None:
    assert load_config(None, [f"log.report_to={value}"]).log.report_to == expected
    assert load_config(None, []).log.report_to == []  # off by default


def test_report_to_rejects_unknown_backends_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"^log\.report_to = \['tensorboard', 'mlflow'\]: each must be one of "
                                          r"tensorboard, wandb$"):  # fmt: skip
        load_config(None, ["log.report_to=tensorboard,mlflow"])
    with pytest.raises(ConfigError, match=r"log\.every_steps = 0: must be an integer >= 1"):
        load_config(None, ["log.every_steps=0"])


def test_scalars_flatten_nested_dicts_and_keep_only_finite_numbers() -> None:
    values = {"test": {"t2i/R@1": 50.0, "note": "x"}, "steps": 3, "ok": True, "bad": math.nan, "list": [1]}
    assert scalars(values) == {"test/t2i/R@1": 50.0, "steps": 3.0}


# ---- training ---------------------------------------------------------------------------------------------------
def test_tensorboard_holds_losses_learning_rate_and_every_evaluated_metric(image_text_set: Path, tmp_path: Path):
    cfg = _train_cfg(image_text_set, tmp_path, "tb", "log.report_to=tensorboard", "log.every_steps=2")
    result = train(cfg, progress=False)
    run = tmp_path / "tb"
    acc = _events(run / TENSORBOARD_DIR)
    steps = result["steps"]  # 2 epochs x 3 steps
    # the loss every 2 optimizer steps (and at the last), the learning rate with it: cosine from 0.05 down to 0
    assert [s for s, _ in _series(acc, "train/loss")] == [2, 4, 6] == list(range(2, steps + 1, 2))
    lrs = _series(acc, "train/lr")
    assert lrs[0][1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / steps)))
    assert lrs[-1][1] == pytest.approx(0.0, abs=1e-12)
    assert all(v > 0 and math.isfinite(v) for _, v in _series(acc, "train/loss"))
    # every validation (the per-epoch log) and the test metrics, equal to the run's own files
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert _series(acc, "val/t2i/R@1") == [(e["step"], pytest.approx(e["val/t2i/R@1"])) for e in epochs]
    for key, value in result["test"].items():
        assert _series(acc, f"test/{key}") == [(steps, pytest.approx(value))], key
    assert _series(acc, "params/trainable") == [(0, result["params"]["trainable"])]
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as text


def test_no_tracking_by_default_and_none_on_other_ranks(image_text_set: Path, tmp_path: Path) -> None:
    train(_train_cfg(image_text_set, tmp_path, "plain", "train.epochs=1"), progress=False)
    assert not (tmp_path / "plain" / TENSORBOARD_DIR).exists()
    cfg = _train_cfg(image_text_set, tmp_path, "rank1", "log.report_to=tensorboard,wandb")
    tracker = open_tracker(cfg, tmp_path / "rank1", enabled=False)  # what ranks > 0 get under torchrun
    assert not tracker.active and not (tmp_path / "rank1").exists()


def test_wandb_offline_run_holds_the_logged_keys(image_text_set: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_home").mkdir()
    result = train(_train_cfg(image_text_set, tmp_path, "wb", "log.report_to=wandb", "train.epochs=1"), progress=False)
    run_id = (tmp_path / "wb" / WANDB_ID_FILE).read_text().strip()
    runs = list((tmp_path / "wandb_home" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, "one offline run, named by the id kept in the run directory"
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in ("train/loss", "train/lr", "test/t2i/R@1", "test/i2t/R@10", "params/trainable", "coop"):
        assert key.encode() in records, key  # history keys and the config (method name)
    assert result["test"]


def test_a_missing_package_is_an_error_naming_the_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    cfg = load_config(None, ["log.report_to=tensorboard,wandb", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"includes wandb, but the wandb package is not installed.*install wandb"):
        open_tracker(cfg, tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install tensorboard .*vlprompt\[track\]"):
        open_tracker(load_config(None, ["log.report_to=tensorboard"]), tmp_path)


class _Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int, str]] = []

    def log(self, values, step, axis):
        self.logged.append((values, step, axis))

    def close(self):
        pass


def test_train_log_reports_the_mean_loss_since_the_last_report_every_n_steps() -> None:
    recorder = _Recorder()
    log = TrainLog(Tracker([recorder]), every=2)
    for step, losses in enumerate([[1.0, 3.0], [5.0], [7.0], [9.0]], start=1):
        for loss in losses:
            log.record(loss)
        log.step(step, lr=0.1 * step, epoch=step / 4, last=step == 4)
    assert [(v["train/loss"], s) for v, s, _ in recorder.logged] == [(3.0, 2), (8.0, 4)]  # (1+3+5)/3, (7+9)/2
    assert recorder.logged[0][0]["train/lr"] == pytest.approx(0.2)


# ---- continual ----------------------------------------------------------------------------------------------------
class _Learner:
    """Task j's accuracy after session i is 60 + 10 j - 5 (i - j): earlier tasks are forgotten."""

    def train_task(self, task: int) -> dict:
        return {"loss": 1.0 / (task + 1), "steps": 3}

    def evaluate(self, session: int) -> SessionResult:
        per_task = [{"acc": 60.0 + 10 * j - 5 * (session - j)} for j in range(session + 1)]
        return SessionResult(per_task, {"acc": 40.0 + session})

    def state_dict(self) -> dict:
        return {"w": torch.zeros(1)}

    def load_state_dict(self, state: dict, session: int) -> None:
        pass


def test_continual_sessions_report_each_cell_of_the_accuracy_matrix(tmp_path: Path) -> None:
    tasks = [{"name": n} for n in ("a", "b", "c")]
    cfg = load_config(None, ["log.report_to=tensorboard"])
    with open_tracker(cfg, tmp_path) as tracker:
        results = run_task_sequence(_Learner(), tasks, tmp_path, tracker=tracker)
    acc = _events(tmp_path / TENSORBOARD_DIR)
    matrix = results["matrices"]["acc"]
    for j, name in enumerate("abc"):  # one curve per task over the sessions that saw it: its forgetting
        assert _series(acc, f"task/acc/{name}") == [(i, pytest.approx(matrix[i][j])) for i in range(j, 3)]
    assert _series(acc, "overall/acc") == [(0, 40.0), (1, 41.0), (2, 42.0)]
    assert _series(acc, "session/loss") == [(i, pytest.approx(1.0 / (i + 1))) for i in range(3)]
    for key, value in results["summary"].items():
        assert _series(acc, key)[-1] == (2, pytest.approx(value)), key
    table = acc.Tensors("matrix/acc/text_summary")[-1]
    text = table.tensor_proto.string_val[0].decode()
    assert table.step == 2 and "| after c | 50.00 | 65.00 | 80.00 |" in text and "| after a | 60.00 | - | - |" in text


# ---- test-time adaptation -----------------------------------------------------------------------------------------
def test_adaptation_gain_is_adapted_minus_before_for_accuracies_and_recalls() -> None:
    adapted = {"cls/top1": 60.0, "cls/top5": 90.0, "samples": 10, "seconds_adapt_per_sample": 1.0}
    before = {"cls/top1": 50.0, "cls/top5": 95.0, "samples": 10, "seconds_adapt_per_sample": 0.0}
    assert adaptation_gain(adapted, before) == {
        "before_adaptation": {"cls/top1": 50.0, "cls/top5": 95.0},
        "gain": {"cls/top1": 10.0, "cls/top5": -5.0},
    }
    recall = adaptation_gain({"t2i/R@1": 30.0, "t2i/MdR": 2.0}, {"t2i/R@1": 20.0, "t2i/MdR": 3.0})
    assert recall["gain"] == {"t2i/R@1": 10.0}  # ranks are not gains


@pytest.mark.parametrize("tune", ["prompt", "encoder"])
def test_the_prediction_before_adaptation_is_the_zero_step_prediction(tune: str) -> None:
    method = _method(tune)
    data = SampleViews(RandomImages(3), _views, seed=0)
    adapted = run_classification(method, data, _cfg("tta.lr=1.0"), torch.device("cpu"))  # adapts by ~1e-2
    zero = run_classification(method, data, _cfg("tta.steps=0"), torch.device("cpu"))
    assert len(adapted.before) == 3 and not zero.before  # a 0-step run has nothing to compare with
    before = dict(zip(adapted.labels, adapted.before))
    for label, scores in zip(zero.labels, zero.scores):  # view 0 in a batch of views vs alone: ~1e-6 apart
        torch.testing.assert_close(before[label], scores, rtol=0, atol=2e-5)
    assert all((b - s).abs().max() > 1e-3 for b, s in zip(adapted.before, adapted.scores))  # not the adapted output


@pytest.mark.skipif(not embedded_weights_path("vlprompt-small").exists(), reason="embedded CLIP weights not shipped")
def test_tta_run_reports_its_metrics_and_gain(small_world: Path, tmp_path: Path) -> None:
    from vlprompt.runners.tta import run_tta

    overrides = [f"data.root={small_world}", f"out_dir={tmp_path}", "tta.max_samples=4", "tta.steps=1",
                 "log.report_to=tensorboard"]  # fmt: skip
    cfg = load_config(WORLD / "tta_rlcf_t2i.yaml", overrides)
    metrics = run_tta(cfg, progress=False)
    saved = scalars(json.loads((tmp_path / "tta_rlcf_t2i" / "metrics.json").read_text()))
    assert saved["gain/t2i/R@1"] == pytest.approx(metrics["t2i/R@1"] - saved["before_adaptation/t2i/R@1"])
    acc = _events(tmp_path / "tta_rlcf_t2i" / TENSORBOARD_DIR)
    for key in ("t2i/R@1", "gain/t2i/R@1", "before_adaptation/t2i/R@5", "samples"):
        assert _series(acc, f"tta/{key}") == [(4, pytest.approx(saved[key]))], key
