"""S-Prompts-style routing: K-means keys per task, L1 distance, nearest task wins; separable synthetic features."""

from __future__ import annotations

import pytest
import torch

from vlprompt.methods.routing import KMeansRouter, kmeans


def _blobs(centres: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (centres.unsqueeze(1) + spread * torch.randn(len(centres), n, centres.shape[1], generator=g)).flatten(0, 1)


def test_kmeans_finds_separated_clusters_and_is_reproducible():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = _blobs(centres, 30, 0.3, 0)
    found = kmeans(x, 3)
    matched = torch.cdist(centres, found).min(dim=1).values
    assert matched.max() < 0.3
    torch.testing.assert_close(found, kmeans(x, 3))
    assert kmeans(x[:2], 5).shape == (2, 2)  # fewer points than centres


def test_routing_accuracy_on_separable_features():
    torch.manual_seed(0)
    task_means = torch.randn(4, 16) * 5
    router = KMeansRouter(num_tasks=4, dim=16, keys_per_task=5)
    for t in range(4):  # each task: two sub-clusters around its mean
        sub = task_means[t] + torch.randn(2, 16)
        router.fit_task(t, _blobs(sub, 20, 0.2, t))
    queries = torch.cat([_blobs(task_means[t : t + 1] + 0.0, 10, 0.5, 10 + t) for t in range(4)])
    labels = torch.arange(4).repeat_interleave(10)
    assert (router.route(queries) == labels).float().mean() == 1.0
    assert router.distances(queries, num_tasks=2).shape == (40, 2)  # only the seen tasks are candidates
    assert set(router.route(queries, num_tasks=2).tolist()) <= {0, 1}


def test_a_key_routes_to_its_task_and_the_distance_is_l1():
    router = KMeansRouter(num_tasks=2, dim=2, keys_per_task=1)
    router.fit_task(0, torch.tensor([[0.0, 0.0]]))
    router.fit_task(1, torch.tensor([[1.5, 1.6]]))
    assert router.route(torch.tensor([[1.5, 1.6], [0.0, 0.0]])).tolist() == [1, 0]
    q = torch.tensor([[3.0, 0.0]])  # L1: 3.0 vs 3.1 -> task 0; L2: 3.0 vs 2.19 -> task 1
    assert router.route(q).tolist() == [0]
    l2 = KMeansRouter(2, 2, 1, metric="l2")
    l2.load_state_dict(router.state_dict())
    assert l2.route(q).tolist() == [1]


def test_routing_needs_keys():
    router = KMeansRouter(3, 4)
    with pytest.raises(RuntimeError, match="keys"):
        router.route(torch.zeros(1, 4))
    router.fit_task(0, torch.randn(10, 4))
    assert router.fitted_tasks() == 1 and router.route(torch.zeros(2, 4)).tolist() == [0, 0]
    with pytest.raises(ValueError, match="metric"):
        KMeansRouter(2, 2, metric="cosine")
