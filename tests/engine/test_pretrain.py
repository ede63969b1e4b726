"""The embedded pretraining recipe: trains, exports compact weights with a model card, reloads them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlprompt import load_backbone
from vlprompt.backbone.embedded import load_embedded_weights, save_embedded_weights
from vlprompt.engine.pretrain import pretrain_embedded, world_texts


def test_pretrain_exports_weights_and_card(small_world: Path, tmp_path: Path) -> None:
    card = pretrain_embedded(
        "vlprompt-tiny",
        small_world,
        tmp_path / "models",
        steps=3,
        batch_size=16,
        lr=1e-3,
        runs_dir=tmp_path / "runs",
        progress=False,
    )
    weights = tmp_path / "models" / "vlprompt-tiny.safetensors"
    assert weights.exists()
    saved = json.loads((tmp_path / "models" / "vlprompt-tiny.json").read_text())
    assert saved["steps"] == "3" and saved["world_size"] == "small"
    assert set(card["zero_shot"]) == {
        "base_val",
        *(f"test_{d}" for d in ("clean", "sketch", "noisy", "blurred", "low_contrast", "textured")),
    }
    assert "t2i/R@1" in card["zero_shot"]["test_sketch"]
    backbone = load_backbone("vlprompt-tiny", str(weights))
    assert abs(float(backbone.logit_scale.detach()) - saved["logit_scale"]) < 0.1


def test_sparse_embedding_round_trip(small_world: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = load_backbone("vlprompt-tiny", pretrained=None)
    texts = world_texts(small_world)
    keep = torch.unique(source.tokenizer(texts)).tolist()
    path = tmp_path / "w.safetensors"
    save_embedded_weights(source.model, path, keep, {"note": "test"})
    target = load_backbone("vlprompt-tiny", pretrained=None)
    load_embedded_weights(target.model, path)
    tokens = source.tokenize(texts[:20])
    with torch.no_grad():
        a = source.encode_text(tokens, normalize=True)
        b = target.encode_text(tokens, normalize=True)
    assert torch.allclose(a, b, atol=5e-3)  # fp16 storage
    table = target.model.token_embedding.weight
    dropped = sorted(set(range(table.shape[0])) - set(keep))[:100]
    assert torch.count_nonzero(table[dropped]) == 0
    assert len(keep) < 2000  # the world's vocabulary is small


def test_world_texts_cover_captions_and_classes(small_world: Path) -> None:
    texts = world_texts(small_world)
    classes = json.loads((small_world / "classification" / "classes.json").read_text())
    assert any(classes["names"][0] in t for t in texts)
    assert len(texts) > 100
