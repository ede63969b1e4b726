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


def test_gram_schmidt_fills_the_whole_space_and_follows_its_generator():
    """``P + count == D`` fits exactly; the random start vectors come from the given generator only."""
    full = gram_schmidt_extend(torch.zeros(0, 5), 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(full @ full.T, torch.eye(5), atol=1e-5, rtol=0)
    torch.manual_seed(123)  # the global RNG state must not matter
    a = gram_schmidt_extend(torch.zeros(0, 6), 3, torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    b = gram_schmidt_extend(torch.zeros(0, 6), 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_ortho_penalty_is_the_mean_squared_deviation_of_the_gram_matrix_from_identity():
    m = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # M M^T - I = diag(3, 0): squared mean 9/4
    assert float(ortho_penalty(m)) == pytest.approx(9 / 4)
    m = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # M M^T - I = [[1, 1], [1, 0]]: squared mean 3/4
    assert float(ortho_penalty(m)) == pytest.approx(3 / 4)
    assert ortho_penalty(m.to(torch.bfloat16)).dtype == torch.bfloat16  # stays in the parameters' dtype


def test_attention_weights_are_cosines_of_query_times_attention_with_keys():
    """``alpha[b, l, m] = cos(q_b * A_lm, K_lm)`` and the prefix is ``sum_m alpha P_m`` per layer."""
    torch.manual_seed(0)
    pool = CodaPromptPool(num_tasks=2, pool_size=4, num_layers=2, length=1, width=3, key_dim=5)
    pool.begin_task(0)
    pool.begin_task(1)
    query = torch.randn(3, 5)
    with torch.no_grad():
        prefix, alpha = pool(query, num_seen=2)
        p, k, a = pool.used(2)
    for b in range(3):
        for layer in range(2):
            for m in range(4):
                want = torch.nn.functional.cosine_similarity(query[b] * a[layer, m], k[layer, m], dim=0)
                assert float(alpha[b, layer, m]) == pytest.approx(float(want), abs=1e-5)
            manual = (alpha[b, layer, :, None, None, None] * p[layer]).sum(0)
            torch.testing.assert_close(prefix[b, layer], manual)


def test_orthogonality_sums_k_a_and_p_terms_of_the_seen_tasks_and_averages_layers():
    torch.manual_seed(0)
    pool = CodaPromptPool(num_tasks=3, pool_size=6, num_layers=2, length=2, width=3, key_dim=4)
    with torch.no_grad():
        for params in (pool.p, pool.k, pool.a):
            for t in params:
                t.normal_()
    pool.requires_grad_(False)
    for seen in (1, 2):
        p, k, a = pool.used(seen)
        assert p.shape[1] == 2 * seen  # only the first `seen` tasks' components
        want = sum(ortho_penalty(k[i]) + ortho_penalty(a[i]) + ortho_penalty(p[i].flatten(1)) for i in range(2)) / 2
        assert float(pool.orthogonality(seen)) == pytest.approx(float(want), rel=1e-5)
    assert float(pool.orthogonality(1)) != pytest.approx(float(pool.orthogonality(3)), rel=1e-3)


def test_one_component_per_task_is_allowed():
    pool = CodaPromptPool(num_tasks=3, pool_size=3, num_layers=1, length=1, width=4, key_dim=4)
    assert pool.per_task == 1


def test_every_layer_of_a_new_chunk_is_orthonormal_and_drawn_from_the_given_generator():
    """Each prompted layer (not each component) gets its own Gram-Schmidt basis, and the random start vectors come
    from ``generator`` alone, so a seeded continual run initialises every task the same way."""
    chunks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        pool = CodaPromptPool(num_tasks=2, pool_size=4, num_layers=3, length=1, width=3, key_dim=5)  # 3 layers, 2 each
        generator = torch.Generator().manual_seed(7)
        pool.begin_task(0, generator)
        pool.begin_task(1, generator)
        for params in (pool.p, pool.k, pool.a):
            for layer in range(3):
                rows = torch.cat([params[0][layer].flatten(1), params[1][layer].flatten(1)]).detach()
                torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-5, rtol=0)
        chunks.append(torch.cat([pool.k[1].detach().flatten(), pool.p[1].detach().flatten()]))
    assert torch.equal(chunks[0], chunks[1])


def test_the_first_task_may_use_the_whole_space():
    """Task 0 is orthogonalised against nothing: with one task, ``pool_size`` components fill a ``pool_size``-wide
    key space exactly."""
    pool = CodaPromptPool(num_tasks=1, pool_size=4, num_layers=1, length=1, width=2, key_dim=4)
    pool.begin_task(0, torch.Generator().manual_seed(0))
    for params in (pool.p, pool.k, pool.a):
        rows = params[0][0].detach().flatten(1)
        torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-5, rtol=0)
