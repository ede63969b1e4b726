"""The continual runner: the generic task loop with a fake learner, and retrieval runs on the small world
(accuracy matrices, resume between tasks, only the current task's prompts train, oracle task, the demo section)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlprompt.backbone import embedded_weights_path
from vlprompt.config import load_config
from vlprompt.errors import ConfigError
from vlprompt.runners.continual import (
    RetrievalLearner,
    SessionResult,
    _Interrupt,
    build_continual_model,
    epoch_cosine,
    run_continual,
    run_task_sequence,
    task_checkpoint,
)

TASKS = [{"name": n} for n in ("a", "b", "c")]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "world"


class FakeLearner:
    """Task j's score after session i is 100 - 10 (i - j) + a counter that training advances."""

    def __init__(self) -> None:
        self.counter = torch.zeros(())
        self.trained: list[int] = []

    def train_task(self, task: int) -> dict:
        self.trained.append(task)
        self.counter += torch.rand(())  # RNG-dependent: resuming must restore the RNG state
        return {"steps": 1}

    def evaluate(self, session: int) -> SessionResult:
        rows = [{"acc": 100.0 - 10 * (session - j) + float(self.counter)} for j in range(session + 1)]
        return SessionResult(rows, {"acc": sum(r["acc"] for r in rows) / len(rows)})

    def state_dict(self) -> dict:
        return {"counter": self.counter.clone()}

    def load_state_dict(self, state: dict, session: int) -> None:
        self.counter = state["counter"].clone()


def test_generic_loop_records_matrices_and_summaries(tmp_path: Path):
    torch.manual_seed(0)
    results = run_task_sequence(FakeLearner(), TASKS, tmp_path, report_metrics=("acc",))
    acc = results["matrices"]["acc"]
    assert [sum(v is not None for v in row) for row in acc] == [1, 2, 3]  # session i evaluates tasks 0..i
    assert acc[2][2] - acc[2][0] == pytest.approx(20.0)
    assert results["summary"]["cl/acc/forgetting"] == pytest.approx(
        ((max(acc[0][0], acc[1][0]) - acc[2][0]) + (acc[1][1] - acc[2][1])) / 2
    )
    assert results["complete"] and "forgetting" in results["definitions"]
    saved = json.loads((tmp_path / "continual.json").read_text())
    assert saved["matrices"]["acc"] == acc and "<img" in (tmp_path / "report.html").read_text()


def test_generic_resume_continues_at_the_next_task_with_identical_results(tmp_path: Path):
    torch.manual_seed(0)
    reference = run_task_sequence(FakeLearner(), TASKS, tmp_path / "ref")
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        run_task_sequence(FakeLearner(), TASKS, tmp_path / "run", interrupt_after_task=1)
    assert task_checkpoint(tmp_path / "run").name == "task_001"
    with pytest.raises(ConfigError, match="resume=true"):
        run_task_sequence(FakeLearner(), TASKS, tmp_path / "run")
    torch.manual_seed(123)  # a different seed: the checkpoint's RNG state must win
    learner = FakeLearner()
    resumed = run_task_sequence(learner, TASKS, tmp_path / "run", resume=True)
    assert learner.trained == [2]
    assert resumed["matrices"] == reference["matrices"]


def test_checkpoints_hold_no_pickle_and_an_older_one_is_refused(tmp_path: Path):
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        run_task_sequence(FakeLearner(), TASKS, tmp_path / "run", interrupt_after_task=0)
    checkpoint = task_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["loop.json", "loop.safetensors", "state.safetensors"]
    # the same checkpoint as an older vlprompt wrote it: the loop state pickled in loop.pt
    for name in ("loop.json", "loop.safetensors"):
        (checkpoint / name).unlink()
    torch.save({"session": 0}, checkpoint / "loop.pt")
    assert task_checkpoint(tmp_path / "run") == checkpoint  # still a run: not overwritten
    with pytest.raises(ConfigError, match="resume=true"):
        run_task_sequence(FakeLearner(), TASKS, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"loop.pt: this run directory was written by an older vlprompt"):
        run_task_sequence(FakeLearner(), TASKS, tmp_path / "run", resume=True)


def test_lpi_epoch_schedule():
    assert [round(0.05 * epoch_cosine(e, 10), 6) for e in range(10)] == [
        round(0.025 * (1 + math.cos(math.pi * e / 10)), 6) for e in range(10)
    ]


# ---- retrieval on the small world ----------------------------------------------------------------------------
def _cfg(world: Path, out: Path, name: str, method: str = "lpi", *extra: str):
    overrides = [
        f"data.root={world}", f"out_dir={out}", f"run_name={name}", "backbone.pretrained=null", "device=cpu",
        "train.epochs=1", "train.batch_size=8", "continual.max_tasks=3", *extra,
    ]  # fmt: skip
    if method == "lpi":
        overrides += ["method.n_tokens=4", "method.layers=4"]
    return load_config(CONFIGS / f"continual_{method}.yaml", overrides)


def test_retrieval_run_writes_matrices_and_report(small_world: Path, tmp_path: Path):
    results = run_continual(_cfg(small_world, tmp_path, "lpi"), progress=False)
    assert [t["name"] for t in results["tasks"]] == ["polygons", "curved shapes", "marks"]
    assert [len(s["per_task"]) for s in results["sessions"]] == [1, 2, 3]
    for metric in ("i2t/R@1", "t2i/R@10", "route/image_acc", "route/text_acc"):
        rows = results["matrices"][metric]
        assert all((v is None) == (j > i) for i, row in enumerate(rows) for j, v in enumerate(row))
    assert {"cl/i2t/R@1/last", "cl/t2i/R@1/forgetting_lpi", "cl/i2t/R@5/bwt"} <= set(results["summary"])
    assert results["sessions"][2]["info"]["gallery_images"] == 3 * 3  # union of the seen tasks' test images
    assert results["params"]["trainable_per_task"] == 4 * (4 + 2 * 4 + 192 + 128)
    assert "<img" in (tmp_path / "lpi" / "report.html").read_text()


def test_retrieval_resume_after_task_one(small_world: Path, tmp_path: Path):
    reference = run_continual(_cfg(small_world, tmp_path, "ref"), progress=False)
    with pytest.raises(_Interrupt):
        run_continual(_cfg(small_world, tmp_path, "run"), progress=False, interrupt_after_task=1)
    log: list[str] = []
    resumed = run_continual(_cfg(small_world, tmp_path, "run", "lpi", "resume=true"), progress=False, log=log.append)
    assert log[0].startswith("resuming after task 1")
    assert resumed["matrices"] == reference["matrices"]


def test_only_the_current_task_trains(small_world: Path, tmp_path: Path):
    cfg = _cfg(small_world, tmp_path, "iso")
    from vlprompt.data.continual import read_tasks_file

    tasks = read_tasks_file(small_world / "continual" / "tasks.json")[:2]
    method = build_continual_model(cfg, 2, torch.device("cpu"))
    learner = RetrievalLearner(cfg, method, tasks)
    learner.train_task(0)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    info = learner.train_task(1)
    assert info["steps"] == 2
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("prompts.1.") for k in changed)
    assert all(k.startswith(("prompts.1.", "image_router.", "text_router.")) for k in changed)


def test_oracle_task_routes_perfectly(small_world: Path, tmp_path: Path):
    cfg = _cfg(small_world, tmp_path, "oracle", "sprompts", "continual.oracle_task=true", "continual.max_tasks=2")
    results = run_continual(cfg, progress=False)
    assert results["summary"]["cl/route/image_acc/last"] == 100.0
    assert results["summary"]["cl/route/text_acc/last"] == 100.0


def test_zeroshot_and_bad_configs(small_world: Path, tmp_path: Path):
    results = run_continual(_cfg(small_world, tmp_path, "zs", "zeroshot"), progress=False)
    assert results["params"]["trainable_per_task"] == 0 and "route/image_acc" not in results["matrices"]
    # a fixed gallery (every task's test set from the start): a frozen model forgets nothing, unseen tasks are scored
    fixed = run_continual(_cfg(small_world, tmp_path, "zs_all", "zeroshot", "continual.eval_gallery=all"), False)
    assert fixed["summary"]["cl/i2t/R@1/forgetting"] == 0.0 and fixed["summary"]["cl/t2i/R@5/bwt"] == 0.0
    assert all(v is not None for row in fixed["matrices"]["i2t/R@1"] for v in row)
    assert fixed["matrices"]["t2i/R@1"][0] == fixed["matrices"]["t2i/R@1"][2]
    with pytest.raises(ConfigError, match="eval_split"):
        run_continual(_cfg(small_world, tmp_path, "bad", "zeroshot", "continual.eval_split=train"), progress=False)


@pytest.mark.skipif(not embedded_weights_path("vlprompt-tiny").exists(), reason="tiny CLIP weights not shipped")
def test_demo_section(small_world: Path, tmp_path: Path):
    from vlprompt.demo import run_demo

    overrides = ["train.batch_size=8", "continual.max_tasks=2"]
    rows = run_demo(small_world, tmp_path / "demo", progress=False, overrides=overrides, sections=("continual",))
    assert [r.method for r in rows] == ["zero-shot", "sequential FT", "S-Prompts", "L2P", "LPI"]
    assert rows[0].trainable == 0 and all(r.trainable > 0 for r in rows[1:])
    assert "route img" in rows[4].metrics and "route img" not in rows[1].metrics
    assert "i2t R@1 matrix" in (tmp_path / "demo" / "report.html").read_text()


def test_a_bad_eval_file_fails_before_the_first_task_trains(
    small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from vlprompt.errors import DataError
    from vlprompt.runners import continual

    bad = tmp_path / "test.json"
    bad.write_text('[{"image": "x.png", "caption": 3}]')
    steps: list[int] = []
    monkeypatch.setattr(continual, "optimizer_step", lambda *args: steps.append(1))
    with pytest.raises(DataError, match=f"{bad}: record 0"):
        run_continual(_cfg(small_world, tmp_path, "bad_eval", "seqft", f"data.test={bad}"), progress=False)
    assert steps == [] and task_checkpoint(tmp_path / "bad_eval") is None
