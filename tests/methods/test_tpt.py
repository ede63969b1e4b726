"""TPT and the shared classification-TTA machinery: selection, the entropy objective, prompts and contexts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlprompt.backbone import load_backbone
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.tpt import confident_views, marginal_entropy

CLASSES = ["red square", "blue circle", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def test_confident_views_keep_the_lowest_entropy_fraction() -> None:
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 64)[:, None]
    kept = confident_views(logits, 0.1)
    assert len(kept) == 6 and len(set(kept.tolist())) == 6
    entropy = _entropy(logits)
    rejected = torch.ones(64, dtype=torch.bool)
    rejected[kept] = False
    assert entropy[kept].max() <= entropy[rejected].min()
    assert len(confident_views(logits[:5], 0.1)) == 1  # never empty


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction() -> None:
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    mean = logits.softmax(-1).mean(0)
    expected = -(mean * mean.log()).sum()
    value = marginal_entropy(logits)
    assert torch.allclose(value.double(), expected, atol=1e-5)
    assert 0 <= value <= math.log(10) and value >= _entropy(logits).mean() - 1e-6  # entropy is concave


def test_prompt_context_starts_as_the_hard_prompt(backbone) -> None:
    method = build_method({"name": "tpt", "tune": "prompt"}, backbone)
    method.set_classes(CLASSES)
    soft = method.text_features()
    hard = torch.nn.functional.normalize(backbone.encode_text([f"a photo of a {c}." for c in CLASSES]), dim=-1)
    assert torch.allclose(soft, hard, atol=1e-5)
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["context.ctx"]


def test_truncated_class_prompts_match_the_full_context(backbone) -> None:
    method = build_method({"name": "tpt", "tune": "prompt"}, backbone)
    method.set_classes(CLASSES)
    short = method.text_features()
    method.truncate_text = False
    assert torch.allclose(short, method.text_features(), atol=1e-5)


def test_tpt_step_lowers_the_entropy_of_the_selected_views(backbone) -> None:
    torch.manual_seed(0)
    method = build_method({"name": "tpt", "tune": "prompt"}, backbone)
    method.set_classes(CLASSES)
    views = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    episode = method.begin(views, keep=0.25)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=5e-3)
    before = method.loss(episode, 0)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = method.loss(episode, 1)
    assert after < before
    assert method.predict(episode).shape == (len(CLASSES),)


def test_context_loads_from_a_saved_coop_checkpoint(backbone, tmp_path: Path) -> None:
    ctx = torch.randn(4, backbone.text_width)
    save_file({"context.ctx": ctx}, str(tmp_path / "trainable.safetensors"))
    method = build_method({"name": "tpt", "ctx_load": str(tmp_path / "trainable.safetensors")}, backbone)
    assert torch.equal(method.context.ctx.data, ctx)
    torch.save({"state_dict": {"ctx": ctx * 2}}, tmp_path / "coop.pth")
    coop = build_method({"name": "tpt", "ctx_load": str(tmp_path / "coop.pth")}, backbone)
    assert torch.equal(coop.context.ctx, ctx * 2)
    with pytest.raises(ConfigError, match="no such file"):
        build_method({"name": "tpt", "ctx_load": str(tmp_path / "missing.pth")}, backbone)


def test_bad_options_are_config_errors(backbone) -> None:
    with pytest.raises(ConfigError, match="tune"):
        build_method({"name": "tpt", "tune": "both"}, backbone)
    with pytest.raises(ConfigError, match="template"):
        build_method({"name": "tpt", "template": "a photo"}, backbone)
