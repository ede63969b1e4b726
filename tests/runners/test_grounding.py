"""Continual grounding runs on a tiny hand-made MDETR set: P@K matrices, routing, task lists, resume, bad images,
the ``vlprompt continual`` dispatch, detector weights, the recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.rec_setup import rec_overrides, write_rec_set
from vlprompt.cli.main import main
from vlprompt.config import load_config
from vlprompt.core.factory import seed_everything
from vlprompt.errors import ConfigError, DataError, WeightsUnavailableError
from vlprompt.runners.continual import _Interrupt
from vlprompt.runners.grounding import (
    build_grounding_model,
    is_grounding,
    run_continual_grounding,
    session_metrics,
)

REPO = Path(__file__).resolve().parents[2]
# the tiny towers have 4 layers: depth and slices <= 4; 4 tokens leave the 32-token context room for the expression
LPI = ["method.name=lpi_ground", "method.depth=4", "method.layers=4", "method.n_tokens=4", "method.n_keys=2"]
TRAIN = ["train.epochs=1", "train.batch_size=2", "train.eval_batch_size=4", "train.optimizer=adamw", "train.lr=0.01",
         "train.weight_decay=0.05", "train.grad_clip=1.0"]  # fmt: skip


@pytest.fixture
def rec_root(tmp_path: Path) -> Path:
    return write_rec_set(tmp_path / "rec")


def _cfg(root: Path, out: Path, name: str, *extra: str):
    return load_config(None, [*rec_overrides(root, out, name), *TRAIN, *extra])


def _seen(matrix: list[list[float | None]]) -> list[int]:
    return [sum(v is not None for v in row) for row in matrix]


def test_lpi_ground_run_records_p_at_k_matrices_routing_and_task_lists(rec_root: Path, tmp_path: Path):
    cfg = _cfg(rec_root, tmp_path, "lpi", *LPI, "continual.oracle_task=true")
    assert is_grounding(cfg)
    results = run_continual_grounding(cfg, progress=False)
    m = results["matrices"]
    for key in ("rec/P@1", "rec/P@5", "rec/P@10", "route/acc", "oracle/P@1"):
        assert _seen(m[key]) == [1, 2], key  # task j after session i, tasks 0..i seen
    for i in range(2):
        for j in range(i + 1):
            assert m["rec/P@1"][i][j] <= m["rec/P@5"][i][j] <= m["rec/P@10"][i][j]
    assert results["complete"] and "cl/rec/P@1/forgetting" in results["summary"]
    assert [t["name"] for t in results["tasks"]] == ["animal", "vehicle"]
    # task t trains on its 4 expressions only: 2 steps of 2; the first task's routing has one choice
    assert [s["info"]["steps"] for s in results["sessions"]] == [2, 2]
    assert [s["info"]["train_expressions"] for s in results["sessions"]] == [4, 4]
    assert [s["info"]["eval_expressions"] for s in results["sessions"]] == [3, 6]
    assert m["route/acc"][0][0] == 100.0
    assert results["params"]["trainable_per_task"] > 0 and results["method"] == "lpi_ground"
    run = tmp_path / "lpi"
    lists = json.loads((run / results["task_lists"]["train"]).read_text())
    assert [t["ids"] for t in lists["tasks"]] == [[1000, 1001, 1002, 1003], [2004, 2005, 2006, 2007]]
    assert (run / results["task_lists"]["test"]).exists()
    assert json.loads((run / "continual.json").read_text())["matrices"]["rec/P@1"] == m["rec/P@1"]
    assert "<img" in (run / "report.html").read_text()


def test_the_trained_prompts_are_the_current_tasks_and_change(rec_root: Path, tmp_path: Path):
    cfg = _cfg(rec_root, tmp_path, "lpi", *LPI, "continual.max_tasks=1")
    run_continual_grounding(cfg, progress=False)
    state = load_file(str(tmp_path / "lpi" / "checkpoints" / "task_000" / "state.safetensors"))
    assert not any(k.startswith(("backbone.", "detector.backbone.")) for k in state)  # the frozen towers stay out
    seed_everything(cfg.seed)  # as the runner does before building the model
    fresh = build_grounding_model(cfg, 1, torch.device("cpu")).state_dict()
    assert not torch.allclose(state["prompts.0.token_v"], fresh["prompts.0.token_v"])  # task 0 trained
    assert torch.equal(state["detector.box_head.dense0.weight"], fresh["detector.box_head.dense0.weight"])  # frozen


def test_zeroshot_grounding_neither_trains_nor_forgets(rec_root: Path, tmp_path: Path):
    results = run_continual_grounding(_cfg(rec_root, tmp_path, "zs", "method.name=zeroshot_ground"), progress=False)
    p1 = results["matrices"]["rec/P@1"]
    assert _seen(p1) == [1, 2] and p1[1][0] == p1[0][0]  # nothing changes between sessions
    assert results["summary"]["cl/rec/P@1/forgetting"] == 0.0
    assert "route/acc" not in results["matrices"] and results["params"]["trainable_per_task"] == 0
    assert [s["info"]["steps"] for s in results["sessions"]] == [0, 0]


def test_resume_after_task_zero_ends_like_an_uninterrupted_run(rec_root: Path, tmp_path: Path):
    reference = run_continual_grounding(_cfg(rec_root, tmp_path, "ref", *LPI), progress=False)
    with pytest.raises(_Interrupt):
        run_continual_grounding(_cfg(rec_root, tmp_path, "run", *LPI), False, interrupt_after_task=0)
    with pytest.raises(ConfigError, match="resume=true"):
        run_continual_grounding(_cfg(rec_root, tmp_path, "run", *LPI), progress=False)
    resumed = run_continual_grounding(_cfg(rec_root, tmp_path, "run", *LPI, "resume=true"), progress=False)
    for key, rows in reference["matrices"].items():
        for got, want in zip(resumed["matrices"][key], rows, strict=True):
            assert got == pytest.approx(want, abs=1e-6), key
    assert [s["info"]["loss"] for s in resumed["sessions"]] == pytest.approx(
        [s["info"]["loss"] for s in reference["sessions"]], abs=1e-4
    )


def test_an_undecodable_image_is_skipped_and_strict_refuses_it(rec_root: Path, tmp_path: Path):
    (rec_root / "images" / "test_1_0.png").write_bytes(b"\x00not a png")
    results = run_continual_grounding(_cfg(rec_root, tmp_path, "bad", "method.name=zeroshot_ground"), progress=False)
    assert [s["info"]["eval_expressions"] for s in results["sessions"]] == [2, 5]
    assert [s["info"]["undecodable_images"] for s in results["sessions"]] == [1, 1]
    assert results["undecodable_images"] == 2
    with pytest.raises(DataError, match="test_1_0.png"):
        run_continual_grounding(_cfg(rec_root, tmp_path, "strict", "method.name=zeroshot_ground", "data.strict=true"),
                                progress=False)  # fmt: skip


def test_session_metrics_on_hand_made_boxes():
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    hit, miss = [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]
    boxes = torch.tensor([[hit] + [miss] * 9, [miss, miss, hit] + [miss] * 7, [miss] * 10])
    tasks, routed = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    oracle = torch.tensor([[hit] * 10] * 3)
    r = session_metrics(1, boxes, target, tasks, routed, oracle)
    assert r.per_task[0] == {"rec/P@1": 100.0, "rec/P@5": 100.0, "rec/P@10": 100.0, "route/acc": 100.0,
                             "oracle/P@1": 100.0, "oracle/P@5": 100.0, "oracle/P@10": 100.0}  # fmt: skip
    assert r.per_task[1]["rec/P@1"] == 0.0 and r.per_task[1]["rec/P@5"] == 50.0 and r.per_task[1]["route/acc"] == 50.0
    assert r.overall["rec/P@1"] == pytest.approx(100 / 3) and r.overall["route/acc"] == pytest.approx(200 / 3)
    plain = session_metrics(0, boxes[:1], target[:1], tasks[:1])
    assert set(plain.per_task[0]) == {"rec/P@1", "rec/P@5", "rec/P@10"}


def test_a_task_without_expressions_and_a_wrong_format_are_config_errors(rec_root: Path, tmp_path: Path):
    tasks = {"order": [1, 2, 3], "names": {"1": "animal", "2": "vehicle", "3": "food"}}
    (rec_root / "tasks3.json").write_text(json.dumps(tasks))
    cfg = _cfg(rec_root, tmp_path, "t3", "method.name=zeroshot_ground", "continual.tasks=tasks3.json")
    with pytest.raises(ConfigError, match=r"task\(s\) \['food'\] have no training expressions"):
        run_continual_grounding(cfg, progress=False)
    # continual.order subsets the sequence: the left-out super-category's expressions are read, then skipped
    one = _cfg(rec_root, tmp_path, "one", "method.name=zeroshot_ground", "continual.order=[2]")
    only = run_continual_grounding(one, progress=False)
    assert [t["name"] for t in only["tasks"]] == ["vehicle"] and only["sessions"][0]["info"]["eval_expressions"] == 3
    with pytest.raises(ConfigError, match="grounding reads data.format"):
        run_continual_grounding(_cfg(rec_root, tmp_path, "k", "method.name=zeroshot_ground", "data.format=karpathy"))


def test_missing_detector_weights_are_a_clear_error(rec_root: Path, tmp_path: Path):
    cfg = _cfg(rec_root, tmp_path, "d", "method.name=zeroshot_ground", f"grounding.detector={tmp_path / 'no-owl'}")
    with pytest.raises(WeightsUnavailableError, match="no-owl"):
        build_grounding_model(cfg, 2, torch.device("cpu"))


def test_continual_command_dispatches_grounding_methods(rec_root: Path, tmp_path: Path, capsys):
    recipe = str(REPO / "configs" / "world" / "grounding_lpi.yaml")
    args = ["continual", recipe, *rec_overrides(rec_root, tmp_path, "cli"), *LPI, *TRAIN, "--quiet"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "cl/rec/P@1/forgetting" in out["summary"] and "cl/route/acc/last" in out["summary"]
    assert out["params"]["trainable_per_task"] > 0
    assert main([*args, "run_name=cli2"]) == 0
    printed = capsys.readouterr().out
    assert "rec/P@1: task (column) after" in printed and "route/acc: task (column) after" in printed


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+", "refcocog"])
def test_refcoco_recipes_carry_spec_4_grounding_hyperparameters(dataset: str):
    cfg = load_config(REPO / "configs" / f"lpi_ground_{dataset}.yaml")
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.schedule, t.epochs, t.batch_size, t.grad_clip) == (
        "adamw", 0.01, 0.05, "cosine", 10, 16, 1.0)  # fmt: skip
    assert cfg.method["name"] == "lpi_ground" and (cfg.method["depth"], cfg.method["n_tokens"]) == (9, 16)
    assert cfg.data.format == "mdetr-refexp" and f"finetune_{dataset}_train.json" in cfg.data.train
    assert cfg.grounding.dataset == dataset and cfg.continual.tasks == "coco" and is_grounding(cfg)


def test_the_world_recipe_runs_on_the_worlds_grounding_part(small_world: Path, tmp_path: Path):
    cfg = load_config(REPO / "configs" / "world" / "grounding_lpi.yaml",
                      [f"data.root={small_world}", f"out_dir={tmp_path}", "backbone.pretrained=null",
                       "grounding.detector=", "continual.max_tasks=2", "train.max_steps=2"])  # fmt: skip
    results = run_continual_grounding(cfg, progress=False)
    assert _seen(results["matrices"]["rec/P@1"]) == [1, 2]
    for s in results["sessions"]:  # one epoch of batches of 16, at most train.max_steps
        assert s["info"]["steps"] == min(2, -(-s["info"]["train_expressions"] // 16)) >= 1
    lists = json.loads((tmp_path / "grounding_lpi" / results["task_lists"]["train"]).read_text())
    names = [t["name"] for t in results["tasks"]]
    assert lists["dataset"] == "world" and [t["name"] for t in lists["tasks"]][:2] == names
