"""The key-query prompt pool: cosine top-k selection, candidate masks, batch-wise vote, gathering, pull loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.prompts.pool import PromptPool


def _pool(**kw) -> PromptPool:
    torch.manual_seed(0)
    pool = PromptPool(pool_size=4, length=2, width=3, key_dim=2, **kw)
    with torch.no_grad():  # keys at 0, 90, 180 and 270 degrees
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    return pool


def test_selects_most_similar_keys():
    pool = _pool(top_k=2)
    query = torch.tensor([[2.0, 0.5], [-0.1, -3.0]])
    out = pool(query)
    assert out.indices.tolist() == [[0, 1], [3, 2]]
    torch.testing.assert_close(out.similarity, F.normalize(query, dim=-1) @ pool.keys.T)
    assert out.prompts.shape == (2, 1, 4, 3)  # [B, layers, k * length, width]
    torch.testing.assert_close(out.prompts[0, 0], torch.cat([pool.prompts[0, 0], pool.prompts[1, 0]]))


def test_allowed_candidates_and_batchwise_vote():
    pool = _pool(top_k=1)
    query = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
    assert pool(query, allowed=[2, 3]).indices.flatten().tolist() == [3, 3, 2]
    assert pool(query, batchwise=True).indices.flatten().tolist() == [0, 0, 0]  # majority of the batch
    with pytest.raises(ValueError, match="allowed prompts"):
        pool(query, top_k=2, allowed=[3])


def test_pull_loss_trains_the_chosen_keys_only():
    pool = _pool(top_k=1)
    query = torch.tensor([[1.0, 0.5]])
    out = pool(query)
    assert out.indices.tolist() == [[0]]
    assert out.pull_loss.item() == pytest.approx(1 - 1.25**-0.5, abs=1e-6)
    out.pull_loss.backward()
    assert pool.keys.grad[0].abs().sum() > 0 and pool.keys.grad[1:].abs().sum() == 0


def test_layers_and_init_options():
    pool = PromptPool(5, 3, 8, 4, top_k=2, layers=6, init="normal:0.1", key_init="zero")
    assert pool.prompts.shape == (5, 6, 3, 8) and pool.keys.abs().sum() == 0
    assert pool.gather(torch.tensor([[4, 1]])).shape == (1, 6, 6, 8)
    assert pool.prompts.abs().max() < 1.0
    assert PromptPool(3, 1, 2, 2).prompts.abs().max() <= 1.0  # L2P's U(-1, 1)
    with pytest.raises(ValueError, match="top_k"):
        PromptPool(3, 1, 2, 2, top_k=4)
    with pytest.raises(ValueError, match="init"):
        PromptPool(3, 1, 2, 2, init="xavier")
