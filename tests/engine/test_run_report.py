"""``vlprompt report``: loading each kind of run directory, grouping seeds, mean ± std, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt.cli.main import main
from vlprompt.engine.run_report import group_runs, load_run, mean_std
from vlprompt.errors import ConfigError


def _run(root: Path, name: str, config: str, files: dict[str, object]) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    for file, content in files.items():
        text = "\n".join(json.dumps(c) for c in content) if file.endswith(".jsonl") else json.dumps(content)
        (path / file).write_text(text)
    return path


def _train(root: Path, name: str, seed: int, r1: float, method: str = "coop") -> Path:
    test = {"t2i/R@1": r1, "t2i/R@5": r1 + 20, "t2i/R@10": r1 + 30, "i2t/R@1": r1 + 1, "i2t/R@5": 60.0,
            "i2t/R@10": 70.0}  # fmt: skip
    curve = [{"epoch": 1, "step": 3, "val/t2i/R@1": r1 - 5}, {"epoch": 2, "step": 6, "val/t2i/R@1": r1}]
    config = f"method: {{name: {method}}}\nseed: {seed}\nrun_name: {name}\ndata: {{test: test_sketch.json}}\n"
    return _run(root, name, config, {"metrics.json": {"test": test, "params": {"trainable": 512}},
                                     "metrics.jsonl": curve})  # fmt: skip


def test_seeds_group_into_mean_and_std(tmp_path: Path) -> None:
    runs = [load_run(_train(tmp_path, f"coop_s{s}", s, r1)) for s, r1 in [(0, 30.0), (1, 32.0), (2, 34.0)]]
    runs.append(load_run(_train(tmp_path, "vpt", 0, 40.0, method="vpt")))
    groups = group_runs(runs)
    assert [len(g) for g in groups] == [3, 1]
    assert mean_std([30.0, 32.0, 34.0]) == (32.0, 2.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    out = tmp_path / "report.html"
    assert main(["report", *(str(r.path) for r in runs), "--out", str(out)]) == 0
    html = out.read_text()
    assert "32.00 ± 2.00" in html  # t2i/R@1 over the three seeds
    assert "recall@K" in html and "validation during training" in html
    assert html.count("<img") == 2


def test_continual_and_tta_runs(tmp_path: Path) -> None:
    continual = _run(tmp_path, "lpi", "method: {name: lpi}\n", {"continual.json": {
        "tasks": [{"name": "animal"}, {"name": "vehicle"}],
        "matrices": {"i2t/R@1": [[50.0, None], [45.0, 60.0]], "t2i/R@1": [[40.0, None], [38.0, 55.0]]},
        "summary": {"cl/i2t/R@1/final_average": 52.5, "cl/i2t/R@1/forgetting_max_minus_last": 5.0},
    }})  # fmt: skip
    zs = _run(
        tmp_path, "zs", "method: {name: zeroshot}\ndata: {test: sketch.json}\n", {"metrics.json": {"cls/top1": 40.0}}
    )
    rlcf = _run(
        tmp_path, "rlcf", "method: {name: rlcf}\ndata: {test: sketch.json}\n", {"metrics.json": {"cls/top1": 46.0}}
    )
    assert load_run(continual).kind == "continual" and load_run(rlcf).kind == "tta"
    out = tmp_path / "r.html"
    assert main(["report", str(continual), str(zs), str(rlcf), "--out", str(out)]) == 0
    html = out.read_text()
    assert "lpi: i2t/R@1" in html and "lpi: t2i/R@1" in html  # one heatmap per direction
    assert "test-time adaptation" in html and "52.5" in html


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="did the run finish"):
        load_run(tmp_path)
