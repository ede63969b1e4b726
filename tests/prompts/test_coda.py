"""CODA-Prompt's component pool: Gram-Schmidt growth, exact freezing of earlier chunks, attention weights."""

from __future__ import annotations

import pytest
import torch

from vlprompt.prompts.coda import CodaPromptPool, gram_schmidt_extend, ortho_penalty


def test_gram_schmidt_extends_an_orthonormal_basis():
    g = torch.Generator().manual_seed(0)
    first = gram_schmidt_extend(torch.zeros(0, 16), 4, g)
    more = gram_schmidt_extend(first, 5, g)
    both = torch.cat([first, more])
    torch.testing.assert_close(both @ both.T, torch.eye(9), atol=1e-5, rtol=0)
    assert float(ortho_penalty(both)) < 1e-10
    with pytest.raises(ValueError, match="orthogonal components"):
        gram_schmidt_extend(both, 8)


def test_tasks_grow_the_pool_and_earlier_chunks_stay_frozen():
    torch.manual_seed(0)
    pool = CodaPromptPool(num_tasks=3, pool_size=6, num_layers=2, length=2, width=8, key_dim=10)
    pool.begin_task(0)
    query = torch.randn(4, 10)
    prefix, alpha = pool(query, num_seen=1)
    assert prefix.shape == (4, 2, 2, 2, 8) and alpha.shape == (4, 2, 2)
    k0 = pool.k[0].detach().clone()
    pool.begin_task(1)
    assert torch.equal(pool.k[0], k0)  # the new chunk's initialisation leaves the old one alone
    assert [p.requires_grad for p in pool.k] == [False, True, False]
    both = torch.cat([pool.k[0][0], pool.k[1][0]])
    torch.testing.assert_close(both @ both.T, torch.eye(4), atol=1e-5, rtol=0)  # Gram-Schmidt against task 0
    prefix, alpha = pool(query, num_seen=2)
    assert alpha.shape == (4, 2, 4)
    (prefix.sum() + pool.orthogonality(2)).backward()
    assert pool.p[0].grad is None and pool.p[1].grad is not None
    manual = torch.einsum("bm,mknd->bknd", alpha[:, 0], torch.cat([pool.p[0][0], pool.p[1][0]]))
    torch.testing.assert_close(prefix[:, 0], manual)
    other, _ = pool(torch.randn(4, 10), num_seen=2)
    assert not torch.allclose(other, prefix)  # the prompt depends on the query (unlike task-indexed prompts)
    assert CodaPromptPool(num_tasks=3, pool_size=10, num_layers=1, length=1, width=4, key_dim=4).per_task == 3
    with pytest.raises(ValueError, match="no component"):
        CodaPromptPool(num_tasks=3, pool_size=2, num_layers=1, length=1, width=4, key_dim=4)
