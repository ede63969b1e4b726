"""Pretraining: any dataset config (full fine-tuning through the trainer, the run as a backbone afterwards) and the
embedded recipe (trains on the world, exports compact weights with a model card, reloads them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlprompt import load_backbone
from vlprompt.backbone.embedded import load_embedded_weights, save_embedded_weights
from vlprompt.config import load_config
from vlprompt.core.factory import build_model
from vlprompt.core.trainer import train
from vlprompt.errors import ConfigError
from vlprompt.run_layout import latest_checkpoint
from vlprompt.runners.eval_run import evaluate_target
from vlprompt.runners.pretrain import pretrain, pretrain_config, pretrain_embedded, world_texts


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
    assert "t2i/R@1" in saved["final_val_during_training"]  # validated once, at the end
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


# ---- any dataset config: `vlprompt pretrain CONFIG` ----------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "world"


def test_pretrain_trains_every_clip_weight_of_a_random_init_model(image_text_set: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ["method.name=finetune", "backbone.pretrained=null", f"data.root={image_text_set}",
                             "data.train=train.json", "data.test=test.json", "train.epochs=1", "train.batch_size=8",
                             f"out_dir={tmp_path}", "run_name=scratch"])  # fmt: skip
    result, run_dir = pretrain(cfg, progress=False)
    assert run_dir == tmp_path / "scratch" and result["steps"] == 24 // 8
    counts = result["params"]
    assert counts["trainable"] == counts["total"]  # the whole CLIP, the temperature included
    assert set(result["test"]) >= {"t2i/R@1", "i2t/R@1"}


def test_pretrain_refuses_a_prompt_method(image_text_set: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ["method.name=coop", f"data.root={image_text_set}", "data.train=train.json",
                             f"out_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"method must be 'finetune', not 'coop'.*method\.name=finetune"):
        pretrain(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # refused before any run directory


def test_the_world_recipe_config_is_the_embedded_recipe() -> None:
    recipe = load_config(CONFIGS / "pretrain_clip.yaml")
    code = pretrain_config("vlprompt-tiny", Path("world"), 800, 256, 1e-3, 0, Path("runs"))
    assert (recipe.backbone, recipe.method, recipe.data, recipe.train) == (
        code.backbone, code.method, code.data, code.train)  # fmt: skip


def test_fine_tune_fully_then_prompt_tune_on_the_world(small_world: Path, tmp_path: Path) -> None:
    """The world is one dataset among others: pretrain on its base part from random init, fine-tune that model
    fully on a shifted domain (the run directory as the backbone), then prompt-tune on top of the fine-tuned run."""
    common = [f"data.root={small_world}", f"out_dir={tmp_path}", "train.batch_size=8", "train.eval_batch_size=64"]
    scratch = load_config(CONFIGS / "pretrain_clip.yaml", [*common, "train.max_steps=2", "run_name=base"])
    _, base = pretrain(scratch, progress=False)
    finetune = load_config(
        CONFIGS / "shift_finetune.yaml", [*common, "train.max_steps=2", f"backbone.pretrained={base}"]
    )
    _, full = pretrain(finetune, progress=False)
    coop_cfg = load_config(CONFIGS / "shift_coop.yaml", [*common, "train.max_steps=2", f"backbone.pretrained={full}"])
    coop = train(coop_cfg, progress=False)
    # the prompt run's backbone is the fine-tuned model, which is not its starting point
    method = build_model(coop_cfg, torch.device("cpu"))
    tuned = load_file(str(latest_checkpoint(full) / "trainable.safetensors"))
    started = load_file(str(latest_checkpoint(base) / "trainable.safetensors"))
    for key, value in method.backbone.model.state_dict().items():
        assert torch.equal(value, tuned[f"backbone.model.{key}"]), key
    assert any(not torch.equal(tuned[k], started[k]) for k in tuned)
    # evaluating the prompt run rebuilds the same chain: run -> fine-tuned run -> pretrained run
    assert evaluate_target(tmp_path / "shift_coop") == pytest.approx(coop["test"])
    assert json.loads((tmp_path / "shift_coop" / "metrics.json").read_text())["params"]["trainable"] == 4 * 128
