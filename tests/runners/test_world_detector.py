"""The world's pretrained detector: the shipped file works (beats new heads), reproduces its model card,
``grounding.detector: world`` resolves to its heads and towers (and refuses what does not fit), the file round-trips
(full towers, or low-rank differences from the base weights), everything shipped stays under 25 MB (the demo's
grounding section: tests/demo/test_grounding.py)."""

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
    DELTA_RANK,
    build_detector_method,
    card_files,
    evaluate,
    main,
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
    # the card describes the shipped file: its towers as rank-DELTA_RANK differences
    assert CARD["towers_stored"]["rank"] == DELTA_RANK == int(wd.heads_metadata(SHIPPED)[wd.RANK_KEY])
    assert CARD["towers_stored"]["file_bytes"] == SHIPPED.stat().st_size
    for name in ("base_val", "test_clean", "test_sketch"):
        assert CARD["stored"][name]["rec/P@1"] > CARD["new_heads_same_seed"][name]["rec/P@1"]


def test_grounding_detector_world_resolves_to_the_shipped_heads_and_towers(small_world: Path):
    cfg = load_config(REPO / "configs" / "world" / "grounding_lpi.yaml", [f"data.root={small_world}"])
    assert cfg.grounding.detector == "world"
    method = build_grounding_model(cfg, 2, torch.device("cpu"))
    stored = wd.load_file(str(SHIPPED))  # fp16
    towers = wd.stored_towers(SHIPPED)  # base + U·V
    heads, clip = _heads(method), method.backbone.model.state_dict()
    assert set(heads) <= set(stored) and any(k.startswith(wd.U_PREFIX) for k in stored)
    assert set(towers) == set(clip) - {"token_embedding.weight"}
    for k in heads:
        assert torch.equal(heads[k], stored[k].float()), k
    for k, v in towers.items():
        assert torch.allclose(clip[k], v, atol=1e-6), k
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


def _rank_tail(delta: torch.Tensor, rank: int) -> float:
    """The Frobenius error of the best rank-``rank`` approximation of ``delta`` (Eckart-Young)."""
    return float(torch.linalg.svdvals(delta.double())[rank:].square().sum().sqrt())


def test_detector_towers_stored_as_low_rank_differences_from_the_base(small_world: Path, tmp_path: Path):
    cfg = recipe_config(small_world)
    method = build_detector_method(cfg)
    base = {k: v.clone() for k, v in method.backbone.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    fc, ln = "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.ln_1.bias"
    with torch.no_grad():  # as if trained: a full-rank change, low-rank ones (a matrix, a conv kernel) and a vector's
        model = method.backbone.model
        model.get_parameter(fc).add_(0.05 * torch.randn(base[fc].shape, generator=gen))
        model.visual.proj.add_(0.5)
        model.get_parameter(ln).add_(torch.linspace(-1, 1, base[ln].numel()))
        kernel = model.visual.conv1.weight  # a rank-1 change of the flattened [out, in*k*k] kernel
        kernel.add_(torch.outer(torch.linspace(-1, 1, kernel.shape[0]), torch.ones(kernel[0].numel())).view_as(kernel))
    meta = {"backbone": "vlprompt-tiny", "pretrained": "world"}
    full, low = tmp_path / "full.safetensors", tmp_path / "low.safetensors"
    wd.save_world_detector(method.detector, full, meta, frozen=("token_embedding.weight",))
    wd.save_world_detector(method.detector, low, meta, frozen=("token_embedding.weight",), rank=4)
    assert low.stat().st_size < full.stat().st_size / 3
    stored = wd.load_file(str(low))
    assert stored[wd.U_PREFIX + fc].shape == (base[fc].shape[0], 4) and stored[wd.V_PREFIX + fc].shape[0] == 4
    assert wd.DELTA_PREFIX + ln in stored and not any(k.startswith(wd.CLIP_PREFIX) for k in stored)
    loaded = build_detector_method(dataclasses.replace(cfg, seed=1), low)
    got, want = loaded.backbone.model.state_dict(), method.backbone.model.state_dict()
    for k, v in _heads(method).items():
        assert torch.allclose(_heads(loaded)[k], v, atol=1e-3, rtol=1e-3), k
    # rank-1 and vector changes come back (fp16), the full-rank one as its best rank-4 approximation
    assert torch.allclose(got["visual.proj"], want["visual.proj"], atol=2e-3)
    assert torch.allclose(got[ln], want[ln], atol=2e-3)
    assert torch.allclose(got["visual.conv1.weight"], want["visual.conv1.weight"], atol=2e-3)
    error, best = float((got[fc] - want[fc]).norm()), _rank_tail(want[fc] - base[fc], 4)
    assert best > 0.5 and error == pytest.approx(best, rel=0.02)
    untouched = "transformer.resblocks.1.mlp.c_proj.weight"
    assert torch.allclose(got[untouched], base[untouched], atol=1e-4)
    assert torch.equal(got["token_embedding.weight"], base["token_embedding.weight"])  # the backbone's own


def test_low_rank_detector_refuses_changed_base_weights(small_world: Path, tmp_path: Path):
    cfg = recipe_config(small_world)
    path = tmp_path / "low.safetensors"
    meta = {"backbone": "vlprompt-tiny", "pretrained": "world"}
    with pytest.raises(ConfigError, match="no tensor token_embedding.weight"):  # stored sparsely: no base to diff
        wd.save_world_detector(build_detector_method(cfg).detector, path, meta, rank=2)
    wd.save_world_detector(build_detector_method(cfg).detector, path, meta, frozen=("token_embedding.weight",), rank=2)
    tampered = {**wd.heads_metadata(path), wd.BASE_KEY: "0" * 64}  # as if vlprompt-tiny were retrained since
    wd.save_file(wd.load_file(str(path)), str(path), metadata=tampered)
    with pytest.raises(ConfigError, match="has changed since"):
        build_detector_method(cfg, path)
    with pytest.raises(ValueError, match="positive"):
        wd.save_world_detector(build_detector_method(cfg).detector, path, meta, rank=0)


def test_everything_shipped_stays_under_25_mb():
    """specs/embedded_world.md: at most 25 MB for everything shipped (the models folder holds all of it)."""
    folder = SHIPPED.parent
    assert folder.name == "models" and SHIPPED.is_file()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 25_000_000, f"{folder} holds {total / 1e6:.2f} MB"


def test_measure_only_restores_at_a_rank_and_remeasures_the_card(small_world: Path, tmp_path: Path):
    card = tmp_path / f"{wd.WORLD_DETECTOR}.json"
    card.write_text(json.dumps(CARD))
    where = ["--world", str(small_world), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):  # --from without --measure-only would silently train
        main([*where, "--from", str(SHIPPED)])
    main([*where, "--measure-only", "--from", str(SHIPPED), "--rank", "8"])
    weights, got = tmp_path / f"{wd.WORLD_DETECTOR}.safetensors", json.loads(card.read_text())
    assert wd.heads_metadata(weights)[wd.RANK_KEY] == "8"
    assert weights.stat().st_size < SHIPPED.stat().st_size
    assert got["towers_stored"] == {**CARD["towers_stored"], "rank": 8, "file_bytes": weights.stat().st_size}
    assert got["train_steps"] == CARD["train_steps"] and "--measure-only --from FILE --rank 8" in got["stored_with"]
    assert set(got["stored"]) == set(card_files(small_world)) == set(got["new_heads_same_seed"])
    assert got["spot_check_base_val"]["expressions"] == CARD["spot_check_base_val"]["expressions"]
    with pytest.raises(ConfigError, match="no model card"):
        main(["--world", str(small_world), "--out", str(tmp_path / "empty"), "--measure-only"])
