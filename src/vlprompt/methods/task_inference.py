"""HiDe-Prompt's shared parts (Wang et al., NeurIPS 2023), reused by HiDe-style methods and IT-Prompt.

* :class:`ClassStatistics`: per-class feature summaries kept instead of exemplars. HiDe's default
  ``multi-centroid``: k-means with ``K`` centroids per class, each with its mean and diagonal variance.
* :func:`sample_pseudo_features`: Gaussian pseudo-features ``mean + sqrt(var + 1e-4) * eps`` of every seen class,
  ``per_centroid`` from each centroid; like HiDe, centroids of zero variance (single-point clusters) are skipped
  unless a class has no other (then its means are used with the 1e-4 floor).
* :class:`TaskIdentityHead`: the task-identity inference (TII) head on frozen, prompt-free features: an MLP
  ``D -> hidden_mult*D -> D`` (LayerNorm and GELU inside) and a linear layer over all classes; the predicted class's
  task is the predicted task.
* :func:`fit_classifier`: the training loop of both stages, on feature tensors: cross-entropy with masked logits
  over shuffled mini-batches. Stage 1 trains on real features of the current task; the *alignment* stage (HiDe's
  ``train_task_adaptive_prediction``, TAP when applied to the prompted features' classifier) trains on
  pseudo-features of every seen class with SGD (momentum 0.9, weight decay 5e-4) and a cosine schedule per epoch.
* :func:`contrastive_regularizer`: HiDe's ``orth_loss``: the batch's features plus the stored centroids, similarity /
  ``temperature``, cross-entropy against the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods.routing import kmeans

VARIANCE_FLOOR = 1e-4  # HiDe adds 1e-4 to the diagonal before sampling


class ClassStatistics(nn.Module):
    """``centroids`` k-means centroids per class with diagonal variances and counts, as buffers (saved with runs)."""

    def __init__(self, num_classes: int, dim: int, centroids: int = 10) -> None:
        super().__init__()
        if centroids < 1:
            raise ValueError(f"need at least one centroid per class, got {centroids}")
        self.register_buffer("means", torch.zeros(num_classes, centroids, dim))
        self.register_buffer("variances", torch.zeros(num_classes, centroids, dim))
        self.register_buffer("counts", torch.zeros(num_classes, centroids, dtype=torch.long))

    @torch.no_grad()
    def fit(self, features: Tensor, labels: Tensor, seed: int = 0) -> None:
        """K-means statistics of every class present in ``labels`` (``features [N, D]``)."""
        features, labels = features.detach().float().cpu(), labels.cpu()
        k = self.means.shape[1]
        for c in labels.unique().tolist():
            x = features[labels == c]
            centres = kmeans(x, k, n_init=3, iters=50, seed=seed * 100_003 + c) if k > 1 else x.mean(0, keepdim=True)
            assign = torch.cdist(x, centres).argmin(dim=1)
            self.means[c].zero_(), self.variances[c].zero_(), self.counts[c].zero_()
            for j in range(len(centres)):
                members = x[assign == j]
                if len(members):
                    self.means[c, j] = members.mean(0).to(self.means)
                    self.variances[c, j] = members.var(0, unbiased=False).to(self.means)
                    self.counts[c, j] = len(members)

    def fitted(self, num_classes: int) -> bool:
        """True when classes ``0 .. num_classes - 1`` all have statistics."""
        return bool((self.counts[:num_classes].sum(1) > 0).all())

    def centroid_means(self, num_classes: int) -> tuple[Tensor, Tensor]:
        """Means ``[M, D]`` of the non-empty centroids of classes ``< num_classes`` and their class ids ``[M]``."""
        used = self.counts[:num_classes] > 0
        classes = torch.arange(num_classes, device=used.device)[:, None].expand_as(used)
        return self.means[:num_classes][used], classes[used]


def sample_pseudo_features(stats: ClassStatistics, num_classes: int, per_centroid: int,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Gaussian pseudo-features ``[M, D]`` and labels ``[M]`` for classes ``0 .. num_classes - 1``."""
    means, var, counts = (
        stats.means[:num_classes].cpu(),
        stats.variances[:num_classes].cpu(),
        stats.counts[:num_classes],
    )
    use = (counts.cpu() > 0) & (var.mean(-1) > 0)
    fallback = ~use.any(dim=1)  # classes whose centroids are all single points: sample around their means anyway
    use[fallback] = counts.cpu()[fallback] > 0
    mu, v = means[use], var[use]
    labels = torch.arange(num_classes)[:, None].expand_as(use)[use]
    eps = torch.randn(len(mu), per_centroid, mu.shape[-1], generator=generator)
    x = mu[:, None] + (v[:, None] + VARIANCE_FLOOR).sqrt() * eps
    return x.reshape(-1, mu.shape[-1]), labels.repeat_interleave(per_centroid)


class TaskIdentityHead(nn.Module):
    """HiDe's TII head: MLP ``D -> hidden_mult*D -> D`` then ``Linear(D, num_classes)``."""

    def __init__(self, dim: int, num_classes: int, hidden_mult: int = 2) -> None:
        super().__init__()
        hidden = dim * hidden_mult
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.LayerNorm(dim), nn.GELU())  # fmt: skip
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, query: Tensor) -> Tensor:
        """Class logits ``[B, C]`` of frozen queries ``[B, D]``."""
        return self.classifier(self.mlp(query))


def fit_classifier(
    model: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    sample: Callable[[int], tuple[Tensor, Tensor]],
    keep: slice,
    epochs: int,
    lr: float,
    batch_size: int,
    optimizer: str = "adam",
    generator: torch.Generator | None = None,
) -> float:
    """Cross-entropy training of ``model`` on features: ``sample(epoch)`` gives ``(x, y)`` for each epoch (fixed
    real features, or fresh pseudo-features); logits outside ``keep`` are masked. Returns the last epoch's mean loss.

    ``optimizer``: ``adam`` (HiDe's TII stage) or ``sgd`` (HiDe's alignment: momentum 0.9, weight decay 5e-4, cosine
    over the epochs).
    """
    if epochs <= 0 or not params:
        return math.nan
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if optimizer == "sgd" else None
    last = math.nan
    for epoch in range(epochs):
        x, y = sample(epoch)
        device = params[0].device
        order = torch.randperm(len(y), generator=generator)
        losses = []
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            logits = model(x[idx].to(device))
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
            allowed[keep] = True
            loss = F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        if schedule is not None:
            schedule.step()
        last = sum(losses) / max(len(losses), 1)
    return last


def contrastive_regularizer(features: Tensor, centroids: Tensor | None, temperature: float = 0.8) -> Tensor:
    """HiDe's ``orth_loss``: rows ``[centroids; features]``, ``sim = M M^T / temperature``, CE to the identity."""
    m = features if centroids is None or len(centroids) == 0 else torch.cat([centroids.to(features), features])
    sim = m @ m.T / temperature
    return F.cross_entropy(sim, torch.arange(len(m), device=m.device))
