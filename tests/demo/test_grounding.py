"""The ``grounding`` demo section on the small world: every row from the world detector, the report written."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vlprompt.demo import DEFAULT_SECTIONS, SECTIONS, grounding, run_demo
from vlprompt.demo.grounding import DEFAULT_TASKS, ROWS, SECTION


def test_grounding_section_runs_every_row_from_the_world_detector(small_world: Path, tmp_path: Path) -> None:
    assert "grounding" in SECTIONS and "grounding" not in DEFAULT_SECTIONS  # over make demo's bound on a CPU
    out = tmp_path / "demo"
    overrides = ["continual.max_tasks=2", "train.max_steps=1", "train.eval_batch_size=16"]
    rows = run_demo(small_world, out, full=True, progress=False, overrides=overrides, sections=("grounding",))
    assert [r.method for r in rows] == [label for _, label, _ in ROWS] + ["LPI (oracle task)"]
    assert all(r.section == SECTION and r.extra["tasks"] == 2 for r in rows)
    by = {r.method: r for r in rows}
    assert by["zero-shot detector"].trainable == 0 and "route" not in by["zero-shot detector"].metrics
    for method in ("S-Prompts", "L2P", "MaPLe", "DCP", "LPI"):
        assert by[method].trainable > 0 and {"P@1", "F@1", "P@5"} <= set(by[method].metrics), method
    assert "route" in by["LPI"].metrics and "route" not in by["L2P"].metrics  # L2P shares one pool: no routing
    assert "P@1 (true task)" in by["LPI (oracle task)"].metrics
    config = (out / "grounding_lpi_oracle" / "config.yaml").read_text()
    assert "detector: world" in config  # every row starts from the world detector
    assert (out / "report.html").is_file()


def test_default_run_is_the_first_tasks_only(small_world: Path, tmp_path: Path, monkeypatch) -> None:
    seen = []

    def fake_run(cfg, progress):  # the section's bookkeeping only; the runs themselves are tested above
        seen.append(cfg)
        return {"summary": {}, "tasks": [{"name": "a"}], "matrices": {"rec/P@1": [[1.0]]},
                "params": {"trainable_per_task": 0}, "seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(grounding, "run_continual_grounding", fake_run)
    ctx = {"out": tmp_path, "progress": False, "console": Console(quiet=True), "overrides": []}
    assert len(grounding.grounding_rows(small_world, False, ctx)) == len(ROWS)
    assert {c.continual.max_tasks for c in seen} == {DEFAULT_TASKS}
    assert {c.grounding.detector for c in seen} == {"world"}
    seen.clear()
    assert len(grounding.grounding_rows(small_world, True, ctx)) == len(ROWS) + 1
    assert {c.continual.max_tasks for c in seen} == {0} and seen[-1].continual.oracle_task
