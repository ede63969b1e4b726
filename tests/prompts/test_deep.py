"""Deep prompt modules: CoOp context, VPT-deep tokens and MaPLe-style coupled prompts."""

from __future__ import annotations

import math

import pytest
import torch

from vlprompt.prompts import CoupledPrompts, DeepPrompts, TextContext, vpt_init_range


def test_text_context_copies_its_init():
    init = torch.randn(4, 16, dtype=torch.float64)
    ctx = TextContext(4, 16, init)
    assert ctx().dtype == torch.float32
    torch.testing.assert_close(ctx(), init.float())
    init.zero_()
    assert ctx().abs().sum() > 0, "the parameter must not share storage with the init tensor"
    assert [n for n, _ in ctx.named_parameters()] == ["ctx"]


def test_text_context_rejects_init_of_wrong_shape():
    with pytest.raises(ValueError, match=r"\(3, 16\)"):
        TextContext(4, 16, torch.zeros(3, 16))


def test_text_context_random_init_is_small_normal():
    torch.manual_seed(0)
    ctx = TextContext(16, 512)()
    assert ctx.shape == (16, 512)
    assert abs(ctx.std().item() - 0.02) < 0.002
    assert abs(ctx.mean().item()) < 0.002


def test_vpt_init_range_formula():
    # ViT-B/16: sqrt(6 / (3 * 16 * 16 + 768)) = sqrt(6 / 1536) = 0.0625
    assert vpt_init_range(16, 768) == pytest.approx(0.0625)
    assert vpt_init_range(32, 768) == pytest.approx(math.sqrt(6 / (3 * 1024 + 768)))


def test_deep_prompts_uniform_init_within_range():
    torch.manual_seed(0)
    bound = vpt_init_range(16, 768)
    prompts = DeepPrompts(12, 10, 768, init_range=bound)
    tokens = prompts()
    assert tokens.shape == (12, 10, 768) and prompts.depth == 12
    assert tokens.abs().max() <= bound
    assert tokens.abs().max() > 0.9 * bound  # spread over the range, not collapsed
    assert sum(p.numel() for p in prompts.parameters()) == 12 * 10 * 768


def test_deep_prompts_normal_init_std():
    torch.manual_seed(0)
    tokens = DeepPrompts(4, 8, 256, std=0.05)()
    assert abs(tokens.std().item() - 0.05) < 0.005


def test_coupled_prompts_structure_and_coupling():
    torch.manual_seed(0)
    init = torch.randn(2, 32)
    prompts = CoupledPrompts(depth=3, n_ctx=2, text_width=32, vision_width=48, ctx_init=init)
    text, vision = prompts()
    assert prompts.depth == 3
    assert [t.shape for t in text] == [(2, 32)] * 3
    assert [v.shape for v in vision] == [(2, 48)] * 3
    torch.testing.assert_close(text[0], init)
    torch.testing.assert_close(text[1], prompts.deep_text.tokens[0])
    for layer in range(3):
        coupler = prompts.couplers[layer]
        torch.testing.assert_close(vision[layer], text[layer] @ coupler.weight.T + coupler.bias)
    # parameters: ctx + (depth-1) deep text prompts + depth linear couplers
    expected = 2 * 32 + 2 * 2 * 32 + 3 * (32 * 48 + 48)
    assert sum(p.numel() for p in prompts.parameters()) == expected


def test_coupled_prompts_depth_one_has_no_deep_text():
    prompts = CoupledPrompts(depth=1, n_ctx=2, text_width=8, vision_width=12)
    text, vision = prompts()
    assert prompts.deep_text is None
    assert len(text) == len(vision) == 1


def test_coupled_vision_prompts_backpropagate_into_text_prompts():
    prompts = CoupledPrompts(depth=2, n_ctx=2, text_width=8, vision_width=12)
    _, vision = prompts()
    vision[1].sum().backward()
    assert prompts.deep_text.tokens.grad is not None and prompts.deep_text.tokens.grad[0].abs().sum() > 0
    assert prompts.couplers[1].weight.grad is not None
    assert prompts.couplers[0].weight.grad is None


def test_deep_prompts_default_std_and_symmetric_uniform_range():
    torch.manual_seed(0)
    assert abs(DeepPrompts(4, 8, 256)().std().item() - 0.02) < 0.002  # VPT's / CoOp's N(0, 0.02^2) default
    tokens = DeepPrompts(4, 8, 256, init_range=0.5)().detach()
    assert tokens.min() < -0.45 and tokens.max() > 0.45  # U(-r, r), not a point mass at r
    assert abs(tokens.mean().item()) < 0.02
