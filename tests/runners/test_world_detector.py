"""The world's pretrained detector: the shipped file works (beats new heads), reproduces its model card,
``grounding.detector: world`` resolves to its heads and towers (and refuses what does not fit), the file round-trips,
(the demo's grounding section: tests/demo/test_grounding.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vlprompt.backbone import world_detector as wd
from vlprompt.backbone.loading import embedded_weights_path
from vlprompt.config import load_config
from vlprompt.errors import ConfigError, WeightsUnavailableError
from vlprompt.runners.grounding import build_grounding_model
from vlprompt.runners.world_detector import (
    build_detector_method,
    evaluate,
    read_as_one_task,
    recipe_config,
    spot_check,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = embedded_weights_path(wd.WORLD_DETECTOR)
CARD = json.loads(SHIPPED.with_suffix(".json").read_text())


def _heads(method) -> dict[str, torch.Tensor]:
    return {k: v for k, v in method.detector.state_dict().items() if not k.startswith("backbone.")}


def test_shipped_heads_ground_far_better_than_new_heads(small_world: Path):
    cfg = recipe_config(small_world)
    samples = [*read_as_one_task(cfg, "grounding/finetune_world-base_val.json"),
               *read_as_one_task(cfg, "grounding/finetune_world_test.json")]  # fmt: skip
    assert len(samples) >= 25
    trained = evaluate(cfg, build_detector_method(cfg, "world"), samples)
    new = evaluate(cfg, build_detector_method(cfg), samples)
    # measured (31 expressions): shipped P@1 25.8 / P@5 58.1; new heads of seeds 0-3: P@1 0.0, P@5 <= 3.2
    assert trained["rec/P@1"] >= new["rec/P@1"] + 15.0, (trained, new)
    assert trained["rec/P@5"] >= new["rec/P@5"] + 40.0, (trained, new)


def test_model_card_reproduces_from_the_stored_heads(small_world: Path):
    """The card's answers for the first base val expressions (the small world renders the same scenes)."""
    recorded = CARD["spot_check_base_val"]
    got = spot_check(recipe_config(small_world), "world", small_world, len(recorded["expressions"]))
    assert got["expressions"] == recorded["expressions"]
    assert torch.allclose(torch.tensor(got["scores"]), torch.tensor(recorded["scores"]), atol=2e-3)
    assert torch.allclose(torch.tensor(got["boxes"]), torch.tensor(recorded["boxes"]), atol=0.1)
    assert got["P@1"] == pytest.approx(recorded["P@1"])
    assert CARD["backbone"] == "vlprompt-tiny" and CARD["pretrained"] == "world"
    for name in ("base_val", "test_clean", "test_sketch"):
        assert CARD["stored"][name]["rec/P@1"] > CARD["new_heads_same_seed"][name]["rec/P@1"]


def test_grounding_detector_world_resolves_to_the_shipped_heads_and_towers(small_world: Path):
    cfg = load_config(REPO / "configs" / "world" / "grounding_lpi.yaml", [f"data.root={small_world}"])
    assert cfg.grounding.detector == "world"
    method = build_grounding_model(cfg, 2, torch.device("cpu"))
    stored = wd.load_file(str(SHIPPED))  # fp16
    heads, clip = _heads(method), method.backbone.model.state_dict()
    assert set(heads) <= set(stored) and any(k.startswith(wd.CLIP_PREFIX) for k in stored)
    for k, v in stored.items():
        mine = clip[k.removeprefix(wd.CLIP_PREFIX)] if k.startswith(wd.CLIP_PREFIX) else heads[k]
        assert torch.equal(mine, v.float()), k
    assert not any(p.requires_grad for h in method.detector.heads() for p in h.parameters())  # prompts train only
    assert not any(p.requires_grad for p in method.backbone.model.parameters())
    off = load_config(
        REPO / "configs" / "world" / "grounding_lpi.yaml", [f"data.root={small_world}", "grounding.detector="]
    )
    plain = build_grounding_model(off, 2, torch.device("cpu"))
    assert not torch.equal(_heads(plain)["box_head.dense2.weight"], heads["box_head.dense2.weight"])
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(plain.backbone.model.state_dict()[name], clip[name])  # the towers were fine-tuned


def test_world_heads_refuse_other_towers_and_say_when_missing(small_world: Path, tmp_path: Path, monkeypatch):
    cfg = load_config(REPO / "configs" / "world" / "grounding_lpi.yaml",
                      [f"data.root={small_world}", "backbone.pretrained=null"])  # fmt: skip
    with pytest.raises(ConfigError, match="trained from backbone vlprompt-tiny / world"):
        build_grounding_model(cfg, 2, torch.device("cpu"))
    monkeypatch.setattr(wd, "embedded_weights_path", lambda name: tmp_path / f"{name}.safetensors")
    with pytest.raises(WeightsUnavailableError, match="python -m vlprompt.runners.world_detector"):
        build_grounding_model(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained="world")),
                              2, torch.device("cpu"))  # fmt: skip


def test_saved_detector_round_trips_in_fp16_with_its_backbone(small_world: Path, tmp_path: Path):
    cfg = recipe_config(small_world)
    method = build_detector_method(cfg)
    with torch.no_grad():
        method.backbone.model.visual.proj.add_(1.0)  # as if trained
    path = tmp_path / "detector.safetensors"
    with pytest.raises(ValueError, match="backbone"):
        wd.save_world_detector(method.detector, path, {})
    wd.save_world_detector(method.detector, path, {"backbone": "vlprompt-tiny", "pretrained": "world"},
                           frozen=("token_embedding.weight",))  # fmt: skip
    assert "clip.token_embedding.weight" not in wd.load_file(str(path))
    loaded = build_detector_method(dataclasses.replace(cfg, seed=1), path)
    for k, v in _heads(method).items():
        assert torch.allclose(_heads(loaded)[k], v, atol=1e-3, rtol=1e-3), k
    assert torch.allclose(loaded.backbone.model.visual.proj, method.backbone.model.visual.proj, atol=1e-2, rtol=1e-3)
    with pytest.raises(ConfigError, match="not a world detector file"):
        build_detector_method(cfg, embedded_weights_path("vlprompt-tiny"))
