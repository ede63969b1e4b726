"""The ``rvlr`` demo section on the small world: teachers cached, every row measured, the report written."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt.backbone import embedded_weights_path
from vlprompt.data.features import FeatureCache
from vlprompt.demo import SECTIONS, run_demo
from vlprompt.demo.rvlr import METRICS

needs_weights = pytest.mark.skipif(
    not (embedded_weights_path("vlprompt-tiny").exists() and embedded_weights_path("vlprompt-small").exists()),
    reason="embedded CLIP weights not shipped",
)


@needs_weights
def test_rvlr_section_on_small_world(small_world: Path, tmp_path: Path) -> None:
    assert "rvlr" in SECTIONS
    out = tmp_path / "demo"
    rows = run_demo(small_world, out, progress=False, overrides=["train.batch_size=16", "train.max_steps=2"],
                    sections=("rvlr",))  # fmt: skip
    assert [r.method for r in rows] == ["zero-shot", "teacher (small, frozen)", "contrastive FT", "RVLR FT"]
    assert all(set(r.metrics) == set(METRICS) for r in rows)
    assert rows[0].trainable == 0 and rows[3].trainable > rows[2].trainable > 0  # + the teachers' linear maps
    assert rows[2].metrics != rows[3].metrics  # the distillation changes the trained model
    image = FeatureCache(out / "rvlr_teachers" / "image")
    assert image.encoder == "vlprompt-small@world/image"
    assert (out / "rvlr_relevance_test_clean.npy").exists() and (out / "report.html").exists()
