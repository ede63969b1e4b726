"""LPI's DecomposedPrompt (CP rank-r, shared layer factor), the full-rank baseline and the interaction module."""

from __future__ import annotations

import torch

from vlprompt.prompts.lpi import CPMatrices, DecomposedPrompt, FullRankPrompt, LowRankInteraction, cp_tensor


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shapes_and_parameter_count():
    torch.manual_seed(0)
    prompt = DecomposedPrompt(9, 16, 768, 512, 4)
    pv, pt = prompt()
    assert pv.shape == (9, 16, 768) and pt.shape == (9, 16, 512) and prompt.rank == 4
    assert _count(prompt) == 5_284 == 4 * (9 + 2 * 16 + 768 + 512)


def test_output_is_the_cp_tensor_with_rank_at_most_r():
    torch.manual_seed(0)
    p = DecomposedPrompt(5, 6, 40, 30, 3)
    pv, pt = p()
    torch.testing.assert_close(pv, torch.einsum("lk,nk,dk->lnd", p.layer, p.token_v, p.channel_v) / 3)
    torch.testing.assert_close(pt, cp_tensor(p.layer, p.token_t, p.channel_t))
    assert all(int(torch.linalg.matrix_rank(pv[layer], rtol=1e-4)) <= 3 for layer in range(5))


def test_layer_factor_is_shared_by_both_modalities():
    torch.manual_seed(0)
    p = DecomposedPrompt(4, 3, 8, 6, 2)
    with torch.no_grad():
        p.layer[2].zero_()
    pv, pt = p()
    assert pv[2].abs().max() == 0 and pt[2].abs().max() == 0 and pv[1].abs().max() > 0
    pv.square().sum().backward()  # a visual-only loss still trains the common factor, not the text factors
    assert p.layer.grad.abs().sum() > 0 and p.token_t.grad is None and p.channel_t.grad is None


def test_initial_statistics():
    torch.manual_seed(0)
    p = DecomposedPrompt(9, 16, 768, 512, 4)
    for factor in (p.layer, p.token_v, p.channel_v, p.channel_t):
        assert 0.4 < float(factor.detach().std()) < 0.6
    assert 0.04 < float(p()[0].detach().std()) < 0.08  # LPI's prompts start with entries of std ~0.06


def test_full_rank_prompt():
    p = FullRankPrompt(1, 16, 768, 512)
    assert _count(p) == 20_480 and p()[0].shape == (1, 16, 768)
    assert float(p.vision.detach().std()) < 0.03


def test_interaction_module():
    module = LowRankInteraction(12, 768, 512, 4)
    assert _count(module) == 12_904 == 4 * 2 * (12 + 1281) + 2 * (768 + 512)  # spec section 2.4
    v, t = torch.randn(16, 768), torch.randn(16, 512)
    nv, nt = module(3, v, t)
    assert nv.shape == v.shape and nt.shape == t.shape
    m = CPMatrices(4, 5, 6, 2)
    torch.testing.assert_close(m.layer(1), cp_tensor(m.a, m.b, m.c)[1])


def test_interaction_is_the_papers_mixing_with_bias_rows_and_m_0_1():
    """Layer l: t' = v W_v2t[l][:-1] + W_v2t[l][-1] (last row = bias), v' likewise; v <- LN_v(0.9 v + 0.1 v'),
    t <- LN_t(0.9 t + 0.1 t'); each matrix is (1/r) sum_k a[l, k] b[:, k] c[:, k]^T."""
    torch.manual_seed(0)
    inter = LowRankInteraction(3, 4, 5, rank=2)
    assert inter.mix == 0.1
    v, t = torch.randn(6, 4), torch.randn(6, 5)
    for layer in range(3):
        m = inter.v2t
        w_vt = sum(m.a[layer, k] * torch.outer(m.b[:, k], m.c[:, k]) for k in range(2)) / 2
        m = inter.t2v
        w_tv = sum(m.a[layer, k] * torch.outer(m.b[:, k], m.c[:, k]) for k in range(2)) / 2
        v_ref = inter.ln_v(0.9 * v + 0.1 * (t @ w_tv[:5] + w_tv[5]))
        t_ref = inter.ln_t(0.9 * t + 0.1 * (v @ w_vt[:4] + w_vt[4]))
        v_out, t_out = inter(layer, v, t)
        assert torch.allclose(v_out, v_ref, atol=1e-5) and torch.allclose(t_out, t_ref, atol=1e-5)


def test_decomposed_prompt_accepts_size_one_and_rejects_each_zero_size():
    import pytest

    pv, pt = DecomposedPrompt(1, 1, 1, 1, 1)()
    assert pv.shape == pt.shape == (1, 1, 1)
    for i in range(5):
        sizes = [2] * 5
        sizes[i] = 0
        with pytest.raises(ValueError, match="rank must be >= 1"):
            DecomposedPrompt(*sizes)


def test_full_rank_prompt_text_shape_and_std():
    torch.manual_seed(0)
    p = FullRankPrompt(2, 16, 64, 512)
    assert p.text.shape == (2, 16, 512)
    assert abs(float(p.text.detach().std()) - 0.02) < 0.002 and abs(float(p.vision.detach().std()) - 0.02) < 0.002


def test_interaction_factors_use_linears_kaiming_init():
    """``kaiming_uniform_(a=sqrt(5))`` on a ``[rows, r]`` factor is U(-1/sqrt(r), 1/sqrt(r)) (LPI's init)."""
    torch.manual_seed(0)
    m = CPMatrices(2000, 2000, 2000, 4)
    for factor in (m.a, m.b, m.c):
        assert 0.99 * 0.5 < float(factor.detach().abs().max()) <= 0.5
