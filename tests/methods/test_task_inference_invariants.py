"""Invariants of HiDe's task-identity parts shared with IT-Prompt (issue 14, mutation testing): the class statistics
(k-means per task and class, each centroid's mean, population variance and count), which centroids the
pseudo-features come from and their formula, the TII head's layers, the classifier trainer (Adam or HiDe's SGD
with momentum 0.9, weight decay 5e-4 and a cosine schedule, masked logits, batches from the generator, the
returned loss) and the contrastive regulariser (centroids then features, similarity / 0.8, CE to the identity)."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.methods import task_inference
from vlprompt.methods.routing import kmeans
from vlprompt.methods.task_inference import (
    ClassStatistics,
    TaskIdentityHead,
    contrastive_regularizer,
    fit_classifier,
    sample_pseudo_features,
)


def _stats(centroids: int, dim: int, rows: dict[tuple[int, int], tuple[list[float], list[float], int]]):
    """Statistics of 3 classes set by hand: ``rows[(class, centroid)] = (mean, variance, count)``."""
    stats = ClassStatistics(3, dim, centroids)
    for (c, j), (mean, var, count) in rows.items():
        stats.means[c, j], stats.variances[c, j], stats.counts[c, j] = torch.tensor(mean), torch.tensor(var), count
    return stats


# ---- ClassStatistics -------------------------------------------------------------------------------------------
def test_class_statistics_default_to_hides_ten_centroids_with_integer_counts():
    stats = ClassStatistics(3, 4)
    assert stats.means.shape == stats.variances.shape == (3, 10, 4)
    assert stats.counts.shape == (3, 10) and stats.counts.dtype == torch.long
    assert ClassStatistics(2, 4, centroids=1).means.shape == (2, 1, 4)  # one centroid: HiDe's single Gaussian
    with pytest.raises(ValueError, match="centroid"):
        ClassStatistics(2, 4, centroids=0)


def test_one_centroid_keeps_each_present_classs_mean_population_variance_and_count():
    torch.manual_seed(0)
    x = torch.randn(9, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    labels = torch.tensor([2, 0, 2, 0, 0, 2, 2, 0, 2])
    stats = ClassStatistics(3, 4, centroids=1)
    stats.fit(x, labels)
    for c, n in ((0, 4), (2, 5)):
        rows = x[labels == c]
        torch.testing.assert_close(stats.means[c, 0], rows.mean(0))
        torch.testing.assert_close(stats.variances[c, 0], rows.var(0, unbiased=False))  # population variance
        assert int(stats.counts[c, 0]) == n
    assert not stats.means[1].any() and not stats.counts[1].any()  # absent class: untouched


def _two_clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: clusters of 3 points near (10, 0) and 2 near (-10, 0); class 1: one point (at most one centroid)."""
    x = torch.tensor([[10.0, 0.0], [11.0, 1.0], [9.0, 2.0], [-10.0, 0.0], [-12.0, 4.0], [0.0, 30.0]])
    return x, torch.tensor([0, 0, 0, 0, 0, 1])


def test_multi_centroid_statistics_summarise_each_cluster_of_each_class():
    x, labels = _two_clusters()
    stats = ClassStatistics(3, 2, centroids=2)
    stats.fit(x, labels)
    got = sorted(
        (int(n), m.tolist(), v.tolist()) for m, v, n in zip(stats.means[0], stats.variances[0], stats.counts[0])
    )
    assert got[0][0] == 2 and got[1][0] == 3
    torch.testing.assert_close(torch.tensor(got[0][1]), x[3:5].mean(0))
    torch.testing.assert_close(torch.tensor(got[0][2]), x[3:5].var(0, unbiased=False))
    torch.testing.assert_close(torch.tensor(got[1][1]), x[:3].mean(0))
    torch.testing.assert_close(torch.tensor(got[1][2]), x[:3].var(0, unbiased=False))
    assert stats.counts[1].tolist() == [1, 0] and stats.means[1, 0].tolist() == [0.0, 30.0]
    assert not stats.variances[1].any()  # a single point has zero variance (not Bessel's NaN)


def test_fit_seeds_kmeans_per_task_and_class_with_three_restarts_of_fifty_iterations(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        bound = inspect.signature(kmeans).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: v for k, v in bound.arguments.items() if k != "x"})
        return kmeans(*args, **kwargs)

    monkeypatch.setattr(task_inference, "kmeans", spy)
    torch.manual_seed(0)
    x, labels = torch.randn(12, 3), torch.tensor([0, 2] * 6)
    ClassStatistics(3, 3, centroids=2).fit(x, labels, seed=3)
    assert calls == [{"k": 2, "n_init": 3, "iters": 50, "seed": 3 * 100_003 + c} for c in (0, 2)]
    calls.clear()
    ClassStatistics(3, 3, centroids=2).fit(x, labels)  # default seed 0 (task 0): the class id alone
    assert [call["seed"] for call in calls] == [0, 2]


def test_fitted_needs_statistics_for_every_class_below_the_bound():
    x, labels = _two_clusters()
    stats = ClassStatistics(3, 2, centroids=2)
    assert not stats.fitted(1)
    stats.fit(x, labels)
    assert stats.fitted(1) and stats.fitted(2)  # class 1 has a single feature: fitted all the same
    assert not stats.fitted(3)


def test_centroid_means_lists_the_non_empty_centroids_with_their_classes():
    x, labels = _two_clusters()
    stats = ClassStatistics(3, 2, centroids=2)
    stats.fit(x, labels)
    means, classes = stats.centroid_means(2)
    assert classes.tolist() == [0, 0, 1]  # class 1's single-point centroid counts, its empty one does not
    assert sorted(means[:2, 0].tolist()) == pytest.approx([-11.0, 10.0])
    assert means[2].tolist() == [0.0, 30.0]
    assert stats.centroid_means(1)[1].tolist() == [0, 0]


# ---- pseudo-features ---------------------------------------------------------------------------------------
def test_pseudo_features_skip_single_point_centroids_unless_a_class_has_nothing_else():
    stats = _stats(3, 2, {
        (0, 0): ([1.0, 2.0], [0.04, 0.09], 5),
        (0, 1): ([5.0, 5.0], [0.0, 0.0], 1),  # a single point beside a real cluster: skipped (HiDe)
        (1, 0): ([-3.0, 1.0], [0.0, 0.0], 1),  # class 1 has single points only: both used, with the 1e-4 floor
        (1, 1): ([-4.0, 0.0], [0.0, 0.0], 1),
        (2, 0): ([7.0, 7.0], [0.5, 0.25], 3),  # beyond num_classes
    })  # fmt: skip
    torch.manual_seed(123)  # the global RNG is not the one used
    x, y = sample_pseudo_features(stats, 2, per_centroid=4, generator=torch.Generator().manual_seed(0))
    mu = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [-4.0, 0.0]])
    var = torch.tensor([[0.04, 0.09], [0.0, 0.0], [0.0, 0.0]])
    eps = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, (mu[:, None] + (var[:, None] + 1e-4).sqrt() * eps).reshape(-1, 2))
    assert y.tolist() == [0] * 4 + [1] * 8


def test_pseudo_features_use_small_variances_and_the_generator_reproduces_them():
    stats = _stats(2, 3, {(0, 0): ([0.0, 1.0, 2.0], [0.01, 0.02, 0.03], 4), (1, 1): ([3.0, 3.0, 3.0], [0.1] * 3, 2)})
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(sample_pseudo_features(stats, 2, per_centroid=5, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(runs[0], runs[1])
    x, y = runs[0]
    assert x.shape == (10, 3) and y.tolist() == [0] * 5 + [1] * 5
    assert 0 < float((x[:5] - torch.tensor([0.0, 1.0, 2.0])).abs().max()) < 1.0


# ---- TII head -----------------------------------------------------------------------------------------------------
def test_tii_head_is_hides_mlp_with_layer_norm_and_gelu_then_a_linear_classifier():
    head = TaskIdentityHead(4, 6)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear, nn.LayerNorm, nn.GELU]
    assert (head.mlp[0].in_features, head.mlp[0].out_features) == (4, 8)  # hidden_mult 2: D -> 2D -> D
    assert head.mlp[1].normalized_shape == (8,) and head.mlp[4].normalized_shape == (4,)
    assert (head.mlp[3].in_features, head.mlp[3].out_features) == (8, 4)
    assert (head.classifier.in_features, head.classifier.out_features) == (4, 6)
    assert TaskIdentityHead(4, 6, hidden_mult=3).mlp[0].out_features == 12
    q = torch.randn(5, 4)
    torch.testing.assert_close(head(q), head.classifier(head.mlp(q)))


# ---- fit_classifier -------------------------------------------------------------------------------------------
def _data(n: int = 8) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    x, y = torch.randn(n, 3), torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1][:n])
    return model, x, y


def _masked(logits: torch.Tensor, keep: slice) -> torch.Tensor:
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    allowed[keep] = True
    return logits.masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("optimizer", ["adam", "sgd", None])
@pytest.mark.parametrize("epochs", [1, 3])
def test_fit_classifier_trains_with_adam_or_hides_sgd_with_momentum_weight_decay_and_cosine(optimizer, epochs):
    model, x, y = _data()
    ref = copy.deepcopy(model)
    keep, lr = slice(1, 4), (0.1 if optimizer == "sgd" else 0.05)
    extra = {} if optimizer is None else {"optimizer": optimizer}  # None: the default, Adam
    got = fit_classifier(model, list(model.parameters()), lambda e: (x, y), keep, epochs, lr, 8,
                         generator=torch.Generator().manual_seed(0), **extra)  # fmt: skip
    if optimizer == "sgd":
        opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    else:
        opt, schedule = torch.optim.Adam(ref.parameters(), lr=lr), None
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)  # one batch of all samples, in the generator's order
        loss = F.cross_entropy(_masked(ref(x[order]), keep), y[order])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    assert got == pytest.approx(float(loss.detach()), rel=1e-5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(model.weight, _data()[0].weight)  # it trained


def test_fit_classifier_draws_each_epochs_batches_from_the_generator_and_covers_every_sample_once():
    seen, epochs = [], []
    linear = nn.Linear(1, 3)

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x[:, 0].long().tolist())
        return linear(x)

    def sample(epoch):
        epochs.append(epoch)
        return torch.arange(10.0)[:, None], torch.arange(10) % 3

    torch.manual_seed(5)  # the global RNG is not the one used
    fit_classifier(model, list(linear.parameters()), sample, slice(0, 3), 2, 0.01, 4,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert epochs == [0, 1]
    g, want = torch.Generator().manual_seed(1), []
    for _ in range(2):
        order = torch.randperm(10, generator=g).tolist()
        want += [order[0:4], order[4:8], order[8:10]]
    assert seen == want


def test_fit_classifier_returns_the_last_epochs_mean_masked_ce_and_nan_without_work():
    model, x, y = _data()
    want = float(F.cross_entropy(model(x)[:, 1:4], y - 1).detach())  # the masked CE: classes 1..3 only
    for epochs, batch in ((1, 8), (2, 4)):  # lr 0: every batch sees the same model
        got = fit_classifier(model, list(model.parameters()), lambda e: (x, y), slice(1, 4), epochs, 0.0, batch)
        assert got == pytest.approx(want, rel=1e-5)
    params = list(model.parameters())
    assert math.isnan(fit_classifier(model, params, lambda e: (x, y), slice(1, 4), 0, 0.1, 4))
    assert math.isnan(fit_classifier(model, [], lambda e: (x, y), slice(1, 4), 2, 0.1, 4))  # nothing to train


# ---- contrastive regulariser -------------------------------------------------------------------------------
def _orth_loss(rows: torch.Tensor, temperature: float) -> float:
    """HiDe's orth_loss with explicit loops: -log softmax_j(<m_i, m_j> / t) at j = i, averaged over the rows."""
    n = len(rows)
    sims = [[float((rows[i] * rows[j]).sum()) / temperature for j in range(n)] for i in range(n)]
    return sum(-(s[i] - math.log(sum(math.exp(v) for v in s))) for i, s in enumerate(sims)) / n


def test_contrastive_regularizer_is_ce_to_the_identity_over_centroids_then_features_at_0_8():
    torch.manual_seed(0)
    z, centroids = torch.randn(4, 3), torch.randn(3, 3)
    assert float(contrastive_regularizer(z, None)) == pytest.approx(_orth_loss(z, 0.8), rel=1e-5)
    assert float(contrastive_regularizer(z, centroids[:0])) == pytest.approx(_orth_loss(z, 0.8), rel=1e-5)
    for c in (centroids[:1], centroids):
        assert float(contrastive_regularizer(z, c)) == pytest.approx(_orth_loss(torch.cat([c, z]), 0.8), rel=1e-5)
    got = float(contrastive_regularizer(z, centroids, temperature=2.0))
    assert got == pytest.approx(_orth_loss(torch.cat([centroids, z]), 2.0), rel=1e-5)
