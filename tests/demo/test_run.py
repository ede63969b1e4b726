"""The demo pipeline on the small world: every row runs, the table prints, the report is written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from vlprompt.backbone import embedded_weights_path
from vlprompt.demo import Row, report, run_demo, section_panels


def test_report_writes_html_and_json(tmp_path: Path) -> None:
    metrics = {k: 10.0 for k in ("t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10")}
    video = {"t2v/R@1": 5.0, "t2v/order_acc": 50.0}
    chance = {"chance": {"t2i/R@1": 0.5, "i2t/R@1": 0.25}}
    rows = [
        Row("s", "zeroshot", "sketch", metrics, 0, 1.0, chance),
        Row("s", "coop", "sketch", {**metrics, "i2t/R@1": 12.5}, 512, 2.0, chance),
        Row("v", "dgl", "video", video, 9, 3.0),
    ]
    path = report(rows, tmp_path, seconds=12.0)
    html = path.read_text()
    assert "coop" in html and "512" in html and "order_acc" in html
    assert html.count("<img") == 2  # one figure of panels per section
    assert "<td>chance (random ranking)</td><td>sketch</td><td class='num'>0.5</td>" in html
    assert re.search(r"Run \d{4}-\d\d-\d\d \d\d:\d\d UTC, in 12 s", html)  # the date and how long it took
    assert "git_sha" in html and "torch" in html and "device" in html  # the environment
    assert "recall at K" in html and "order_acc" in html.split("what the numbers mean")[1]  # every column defined
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[1]["trainable"] == 512 and saved[1]["metrics"]["i2t/R@1"] == 12.5  # the numbers, unchanged


def test_every_direction_of_a_section_is_plotted() -> None:
    metrics = {"t2i/R@1": 1.0, "t2i/R@5": 2.0, "t2i/R@10": 3.0, "i2t/R@1": 4.0, "i2t/R@5": 5.0, "ms/sample": 9.0}
    rows = [Row("s", "zeroshot", "sketch", metrics, 0, 1.0, {"chance": {"t2i/R@1": 0.5}}),
            Row("s", "coop", "sketch", {k: v + 1 for k, v in metrics.items()}, 512, 2.0)]  # fmt: skip
    panels = section_panels(rows)
    assert [p.title for p in panels] == ["text → image (t2i)", "image → text (i2t)"]  # ms/sample is no score
    t2i, i2t = panels
    assert t2i.groups == ["R@1", "R@5", "R@10"]
    assert t2i.series == {"zeroshot": [1.0, 2.0, 3.0], "coop": [2.0, 3.0, 4.0]}
    assert i2t.series == {"zeroshot": [4.0, 5.0], "coop": [5.0, 6.0]}
    assert t2i.chance[0] == 0.5 and math.isnan(t2i.chance[1])
    # several domains (--full): domains side by side, the leading score of each direction
    other = [Row("s", r.method, "noisy", {k: v + 10 for k, v in r.metrics.items()}, 0, 1.0) for r in rows]
    panels = section_panels(rows + other)
    assert [p.title for p in panels] == ["text → image (t2i): t2i/R@1", "image → text (i2t): i2t/R@1"]
    assert panels[0].groups == ["sketch", "noisy"] and panels[0].series["coop"] == [2.0, 12.0]
    # one score per direction (continual's final R@1): one panel over the directions; forgetting apart
    cl = {"i2t/R@1": 30.0, "t2i/R@1": 27.0, "i2t forget": 2.0, "t2i forget": 1.0, "route img": 80.0}
    panels = section_panels([Row("c", "LPI", "world", cl, 1, 1.0)])
    assert [(p.title, p.groups) for p in panels] == [
        ("R@1", ["i2t", "t2i"]), ("forgetting", ["i2t forget", "t2i forget"]), ("route img", ["route img"])
    ]  # fmt: skip
    assert panels[1].lower_is_better and not panels[0].lower_is_better


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
