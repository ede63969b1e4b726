"""``vlprompt metrics`` on small saved matrices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlprompt.cli.main import main
from vlprompt.errors import DataError

# Rows are queries; row 0's ground truth (column 0) is beaten by column 1, the others win.
SIM = np.array([[0.2, 0.9, 0.1], [0.1, 0.8, 0.3], [0.0, 0.4, 0.7]], dtype=np.float32)


@pytest.fixture
def sim_path(tmp_path: Path) -> Path:
    path = tmp_path / "sim.npy"
    np.save(path, SIM)
    return path


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, float]:
    assert main(["metrics", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rows_as_queries_json(sim_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = _run_json(capsys, "--sim", str(sim_path))
    expected = {"t2v/R@1": 200 / 3, "t2v/R@5": 100.0, "t2v/R@10": 100.0, "t2v/MdR": 1.0, "t2v/MnR": 4 / 3}
    assert metrics == pytest.approx(expected)


def test_transpose_and_prefix(sim_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Columns as queries: column 1's gt (0.8) is beaten by row 0 (0.9); columns 0 and 2 rank their gt first.
    metrics = _run_json(capsys, "--sim", str(sim_path), "--transpose")
    assert metrics["v2t/R@1"] == pytest.approx(200 / 3)
    assert metrics["v2t/MnR"] == pytest.approx(4 / 3)
    metrics = _run_json(capsys, "--sim", str(sim_path), "--prefix", "q2g")
    assert set(metrics) == {"q2g/R@1", "q2g/R@5", "q2g/R@10", "q2g/MdR", "q2g/MnR"}


def test_gt_file_with_transpose(tmp_path: Path, sim_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps([1, [1, 2], 2]))  # rows 0 and 1 -> column 1, rows 1 and 2 -> column 2
    assert _run_json(capsys, "--sim", str(sim_path), "--gt", str(gt))["t2v/R@1"] == 100.0
    # Column 0 is nobody's ground truth, so the reverse direction cannot be evaluated.
    assert main(["metrics", "--sim", str(sim_path), "--gt", str(gt), "--transpose"]) == 2
    assert "ground truth of no query" in capsys.readouterr().err
    np.save(tmp_path / "gt.npy", np.array([0, 2, 1]))
    metrics = _run_json(capsys, "--sim", str(sim_path), "--gt", str(tmp_path / "gt.npy"), "--transpose")
    # Column 0 -> row 0 (0.2, best); column 1 -> row 2 (0.4, below 0.9 and 0.8); column 2 -> row 1 (0.3, below 0.7).
    assert metrics["v2t/R@1"] == pytest.approx(100 / 3)
    assert metrics["v2t/MnR"] == pytest.approx((1 + 3 + 2) / 3)


def test_pessimistic_ties(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tied.npy"
    np.save(path, np.array([[0.5, 0.5], [0.0, 1.0]]))
    assert _run_json(capsys, "--sim", str(path))["t2v/R@1"] == 100.0
    assert _run_json(capsys, "--sim", str(path), "--ties", "pessimistic")["t2v/R@1"] == 50.0


def test_table_output(sim_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "--sim", str(sim_path)]) == 0
    out = capsys.readouterr().out
    assert "t2v/R@1" in out and "66.667" in out


def test_missing_file_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlprompt.cli import metrics_cmd
    from vlprompt.cli.main import build_parser

    missing = tmp_path / "nope.npy"
    args = build_parser().parse_args(["metrics", "--sim", str(missing)])
    with pytest.raises(DataError, match="nope.npy"):
        metrics_cmd.run(args)
    assert main(["metrics", "--sim", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bad_shape_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vec.npy"
    np.save(path, np.zeros(3))
    assert main(["metrics", "--sim", str(path)]) == 2
    assert "2-D" in capsys.readouterr().err


def test_qbnorm_is_reported_separately(tmp_path, capsys) -> None:
    import json

    import numpy as np

    from vlprompt.cli.main import main

    rng = np.random.default_rng(0)
    sim = rng.normal(size=(20, 20)) + 3 * np.eye(20)
    bank = rng.normal(size=(50, 20))
    np.save(tmp_path / "sim.npy", sim)
    np.save(tmp_path / "bank.npy", bank)
    args = ["metrics", "--sim", str(tmp_path / "sim.npy"), "--json"]
    assert main([*args, "--qbnorm-bank", str(tmp_path / "bank.npy"), "--qbnorm-beta", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "t2v/R@1" in out and "t2v+qbnorm/R@1" in out
    assert main(args) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["t2v/R@1"] == out["t2v/R@1"]  # the raw numbers never include QB-Norm
    np.save(tmp_path / "bad.npy", rng.normal(size=(5, 7)))
    assert main([*args, "--qbnorm-bank", str(tmp_path / "bad.npy")]) == 2
