"""Demo section ``caption``: the shipped world captioner, zero-shot and + RLCF, on a shifted domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt.backbone import embedded_weights_path
from vlprompt.backbone.embedded_captioner import WORLD_LM, WORLD_MAPPERS
from vlprompt.config import load_config
from vlprompt.demo import SECTIONS, run_demo
from vlprompt.demo.caption import RLCF_S, _recipes, row_metrics
from vlprompt.demo.sections import CONFIGS
from vlprompt.methods.rlcf import reward_specs
from vlprompt.methods.rlcf_caption import RLCFCaptionOptions
from vlprompt.options import options_from_dict

SHIPPED = all(embedded_weights_path(n).exists() for n in (WORLD_LM, *WORLD_MAPPERS, "vlprompt-small"))


def test_row_metrics_scale_and_keep_the_unavailable_reason() -> None:
    summary = {"seconds_per_image": 0.25, "metrics": {"all": {
        "BLEU-4": 0.1, "CIDEr": 0.5, "SPICE": None, "CLIPScore": 0.7, "RefCLIPScore": 0.4, "METEOR": 0.2,
        "unavailable": {"SPICE": "no CoreNLP jars"}}}}  # fmt: skip
    metrics, unavailable = row_metrics(summary)
    assert metrics == pytest.approx(
        {"B@4": 10.0, "CIDEr": 50.0, "CLIP-S": 70.0, "RefCLIP-S": 40.0, "ms/sample": 250.0}
    )
    assert unavailable == {"SPICE": "no CoreNLP jars"}  # never reported as 0


@pytest.mark.skipif(not SHIPPED, reason="the world captioner is not shipped")
def test_caption_section_runs_on_small_world(small_world: Path, tmp_path: Path) -> None:
    assert "caption" in SECTIONS
    rows = run_demo(small_world, tmp_path / "demo", progress=False, sections=("caption",),
                    overrides=["tta.steps=1", "method.sample_k=2"])  # fmt: skip
    assert [r.method for r in rows] == ["ClipCap", "ClipCap + RLCF", "CapDec", "CapDec + RLCF"]
    assert {r.domain for r in rows} == {"sketch"}
    for r in rows:
        assert {"B@4", "CIDEr", "CLIP-S", "RefCLIP-S", "ms/sample"} <= set(r.metrics)
        assert "SPICE" in r.metrics or "SPICE" in r.extra["unavailable"]
        assert r.extra["images"] == 20 and (r.trainable > 0) == ("RLCF" in r.method)
    assert rows[1].extra["tta"]["steps"] == 1 and rows[0].extra["tta"] is None
    assert (tmp_path / "demo" / "report.html").exists()


def test_full_run_adds_rlcf_s_with_both_embedded_rewards() -> None:
    assert [r[0] for r in _recipes(False)] == ["ClipCap", "ClipCap + RLCF", "CapDec", "CapDec + RLCF"]
    full = _recipes(True)
    assert [r[0] for r in full if "RLCF-S" in r[0]] == ["ClipCap + RLCF-S", "CapDec + RLCF-S"]
    section = dict(load_config(CONFIGS / "rlcf_caption_capdec.yaml", RLCF_S).method)
    section.pop("name")
    options = options_from_dict(RLCFCaptionOptions, section, "rlcf_caption")
    assert reward_specs(options) == [("vlprompt-small", "world"), ("vlprompt-tiny", "world")]
    assert options.mapper_weights == "vlprompt-world-capdec" and options.sample_k == 6
