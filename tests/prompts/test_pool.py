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
    assert (pool.pool_size, pool.length) == (5, 3)
    assert pool.gather(torch.tensor([[4, 1]])).shape == (1, 6, 6, 8)
    assert pool.prompts.abs().max() < 1.0
    assert PromptPool(3, 1, 2, 2).prompts.abs().max() <= 1.0  # L2P's U(-1, 1)
    with pytest.raises(ValueError, match="top_k"):
        PromptPool(3, 1, 2, 2, top_k=4)
    with pytest.raises(ValueError, match="init"):
        PromptPool(3, 1, 2, 2, init="xavier")


def test_defaults_top_k_bounds_pull_loss_scale_and_batchwise_ties():
    """Defaults: top-1, no batchwise vote; top_k may equal the pool size; the pull loss sums over the k chosen keys
    and averages over the batch; the batchwise vote breaks ties towards the lower prompt index."""
    pool = PromptPool(4, 2, 3, key_dim=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = pool(query)
    assert out.indices.tolist() == [[0], [1]]  # top-1 each, not a batch vote
    assert float(out.pull_loss.detach()) == pytest.approx(0.0, abs=1e-6)
    two = pool(query, top_k=2)  # second picks: cos 0 each -> pull = (0 + 1) per sample, mean 1
    assert float(two.pull_loss.detach()) == pytest.approx(1.0, abs=1e-6)
    assert PromptPool(3, 1, 2, key_dim=2, top_k=3).top_k == 3
    voted = pool.select(pool.similarity(query), batchwise=True)  # prompts 0 and 1 chosen once each: tie -> 0
    assert voted.tolist() == [[0], [0]]


def test_select_defaults_to_per_sample_choice_and_allows_exactly_k_candidates():
    pool = _pool(top_k=1)
    query = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    assert pool.select(pool.similarity(query)).flatten().tolist() == [0, 1]  # no batch vote by default
    assert sorted(pool(query, top_k=2, allowed=[2, 3]).indices[0].tolist()) == [2, 3]  # exactly k allowed


def test_batchwise_vote_follows_the_majority_and_serves_k_prompts():
    pool = _pool(top_k=1)
    query = torch.tensor([[-1.0, 0.1], [-1.0, -0.1], [-1.0, 0.2], [1.0, 0.0]])  # three votes for key 2, one for 0
    assert pool(query, batchwise=True).indices.flatten().tolist() == [2, 2, 2, 2]
    two = pool(query, top_k=2, batchwise=True).indices
    assert two.shape == (4, 2) and all(row == two[0].tolist() for row in two.tolist())


@pytest.mark.parametrize(("how", "std"), [("normal", 0.02), ("normal:0.5", 0.5)])
def test_pool_init_options(how: str, std: float):
    torch.manual_seed(0)
    pool = PromptPool(50, 2, 20, 4, init=how)
    assert abs(float(pool.prompts.detach().std()) - std) < 0.1 * std
    uniform = PromptPool(50, 2, 20, 4).prompts.detach()  # L2P's U(-1, 1), symmetric
    assert float(uniform.min()) < -0.95 and float(uniform.max()) > 0.95
