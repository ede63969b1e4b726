"""The demo pipeline on the small world: every row runs, the table prints, the report is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt.backbone import embedded_weights_path
from vlprompt.engine.demo import Row, report, run_demo


def test_report_writes_html_and_json(tmp_path: Path) -> None:
    metrics = {k: 10.0 for k in ("t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10")}
    video = {"t2v/R@1": 5.0, "t2v/order_acc": 50.0}
    rows = [
        Row("s", "zeroshot", "sketch", metrics, 0, 1.0),
        Row("s", "coop", "sketch", metrics, 512, 2.0),
        Row("v", "dgl", "video", video, 9, 3.0),
    ]
    path = report(rows, tmp_path)
    html = path.read_text()
    assert "coop" in html and "<img" in html and "512" in html and "order_acc" in html
    assert json.loads((tmp_path / "results.json").read_text())[1]["trainable"] == 512


@pytest.mark.skipif(not embedded_weights_path("vlprompt-tiny").exists(), reason="tiny CLIP weights not shipped")
def test_demo_runs_on_small_world(small_world: Path, tmp_path: Path) -> None:
    rows = run_demo(small_world, tmp_path / "demo", progress=False,
                    overrides=["train.batch_size=16", "train.epochs=1"])  # fmt: skip
    assert [r.method for r in rows] == ["zeroshot", "coop", "vpt", "maple"]
    assert rows[0].trainable == 0 and all(r.trainable > 0 for r in rows[1:])
    assert (tmp_path / "demo" / "report.html").exists()


@pytest.mark.skipif(not embedded_weights_path("vlprompt-tiny").exists(), reason="tiny CLIP weights not shipped")
def test_demo_video_section_on_small_world(small_world: Path, tmp_path: Path) -> None:
    overrides = ["train.batch_size=4", "train.epochs=1"]  # all 12 frames: a reversal has the same frames
    rows = run_demo(small_world, tmp_path / "demo", progress=False, overrides=overrides, sections=("video",))
    assert [r.method for r in rows] == ["zeroshot", "dgl_transformer"]
    assert all("t2v/order_acc" in r.metrics for r in rows)
    assert rows[0].metrics["t2v/order_acc"] == 50.0  # mean-pooled frames cannot tell a video from its reversal
