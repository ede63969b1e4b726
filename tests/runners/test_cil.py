"""Class-incremental runs on the small world: the runner's matrices and measures, the saved class order, resume,
the ``vlprompt continual`` dispatch, and the demo section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt.backbone import embedded_weights_path
from vlprompt.cli.main import main
from vlprompt.config import load_config
from vlprompt.errors import ConfigError
from vlprompt.eval.cil import faa, ffm
from vlprompt.runners.cil import is_class_incremental, run_class_incremental
from vlprompt.runners.continual import _Interrupt

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "world"
SMALL = ["method.layers=[0,1]", "method.length=2", "method.tii_epochs=2", "method.centroids=1",
         "method.align_epochs=2", "method.align_samples=4"]  # fmt: skip


def _cfg(world: Path, out: Path, name: str, recipe: str, *extra: str):
    overrides = [f"data.root={world}", f"out_dir={out}", f"run_name={name}", "backbone.pretrained=null",
                 "cil.max_tasks=3", "train.batch_size=8", *extra]  # fmt: skip
    return load_config(CONFIGS / f"{recipe}.yaml", overrides)


def test_itprompt_run_records_matrices_measures_and_the_class_order(small_world: Path, tmp_path: Path):
    cfg = _cfg(small_world, tmp_path, "it", "cil_itprompt", *SMALL, "cil.oracle_eval=true")
    assert is_class_incremental(cfg)
    results = run_class_incremental(cfg, progress=False)
    acc = results["matrices"]["acc"]
    assert [sum(v is not None for v in row) for row in acc] == [1, 2, 3] and results["complete"]
    assert results["summary"]["cil/acc/faa"] == pytest.approx(faa(acc))
    assert results["summary"]["cil/acc/ffm"] == pytest.approx(ffm(acc))
    assert "cil/acc_oracle/faa" in results["summary"] and "task_acc" in results["matrices"]
    assert "faa" in results["definitions"] and results["params"]["trainable_per_task"] > 0
    world_split = json.loads((small_world / "classification" / "cil_tasks.json").read_text())
    saved = json.loads((tmp_path / "it" / "class_split.json").read_text())
    assert saved["tasks"] == world_split["tasks"]  # the full split is saved with the run
    assert results["class_split"]["tasks"] == world_split["tasks"][:3]
    assert [len(t["classes"]) for t in results["tasks"]] == [len(t) for t in world_split["tasks"][:3]]
    assert "accuracy" not in results["tasks"][0] and "<img" in (tmp_path / "it" / "report.html").read_text()


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(small_world: Path, tmp_path: Path):
    extra = ["method.pool_size=20", "method.layers=[0,1]", "cil.max_tasks=3"]
    reference = run_class_incremental(_cfg(small_world, tmp_path, "ref", "cil_coda", *extra), progress=False)
    with pytest.raises(_Interrupt):
        run_class_incremental(_cfg(small_world, tmp_path, "run", "cil_coda", *extra), False, interrupt_after_task=0)
    with pytest.raises(ConfigError, match="resume=true"):
        run_class_incremental(_cfg(small_world, tmp_path, "run", "cil_coda", *extra), progress=False)
    resumed = run_class_incremental(_cfg(small_world, tmp_path, "run", "cil_coda", *extra, "resume=true"), False)
    assert resumed["matrices"]["acc"] == reference["matrices"]["acc"]
    assert [s["info"]["loss"] for s in resumed["sessions"]] == [s["info"]["loss"] for s in reference["sessions"]]


def test_generated_class_orders_follow_the_seed_and_are_checked_on_resume(small_world: Path, tmp_path: Path):
    def split_of(name: str, *extra: str) -> list:
        cfg = _cfg(small_world, tmp_path, name, "cil_zeroshot", "cil.tasks=''", "cil.num_tasks=8", "cil.max_tasks=1",
                   *extra)  # fmt: skip
        run_class_incremental(cfg, progress=False)
        return json.loads((tmp_path / name / "class_split.json").read_text())["tasks"]

    a, b, c = split_of("a", "seed=5"), split_of("b", "seed=5"), split_of("c", "seed=6")
    assert a == b != c and len(a) == 8 and sorted(x for t in a for x in t) == list(range(96))
    with pytest.raises(ConfigError, match="different class order"):
        run_class_incremental(_cfg(small_world, tmp_path, "a", "cil_zeroshot", "cil.tasks=''", "cil.num_tasks=8",
                                   "seed=7", "resume=true"), progress=False)  # fmt: skip


def test_continual_command_dispatches_class_incremental_configs(small_world: Path, tmp_path: Path, capsys):
    args = ["continual", str(CONFIGS / "cil_zeroshot.yaml"), f"data.root={small_world}", f"out_dir={tmp_path}",
            "backbone.pretrained=null", "cil.max_tasks=2"]  # fmt: skip
    assert main([*args, "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["params"]["trainable_per_task"] == 0 and "cil/acc/faa" in out["summary"]
    assert main([*args, "run_name=printed", "--quiet"]) == 0
    assert "faa" in capsys.readouterr().out


@pytest.mark.skipif(not embedded_weights_path("vlprompt-tiny").exists(), reason="tiny CLIP weights not shipped")
def test_demo_section(small_world: Path, tmp_path: Path):
    from vlprompt.demo import run_demo

    overrides = ["train.batch_size=8", "cil.max_tasks=2"]
    rows = run_demo(small_world, tmp_path / "demo", progress=False, overrides=overrides, sections=("cil",))
    assert [r.method for r in rows] == ["zero-shot CLIP", "L2P", "DualPrompt", "CODA-Prompt", "IT-Prompt",
                                        "IT-Prompt, C-NCM"]  # fmt: skip
    assert rows[0].trainable == 0 and all(r.trainable > 0 for r in rows[1:])
    assert {"FAA", "CAA", "FFM", "forgetting (CODA)"} <= set(rows[4].metrics) and "task id" in rows[4].metrics
    assert "accuracy matrix" in (tmp_path / "demo" / "report.html").read_text()
