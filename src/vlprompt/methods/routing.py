"""S-Prompts-style task routing: K-means keys per task on frozen features, nearest task wins (L1 distance).

After task ``t`` trains, K-means (``k`` centres, 5 in S-Prompts and LPI) runs on the frozen features of its training
data and the centres become task ``t``'s keys. A query goes to ``argmin_j min_c ||f - key_{j,c}||_1`` over the
tasks seen so far. L1 is what S-Prompts and LPI compute (``(((f - c) ** 2) ** 0.5).sum(1)``), kept for fidelity.
K-means itself is the usual squared-Euclidean Lloyd's algorithm with k-means++ seeding and 10 restarts
(scikit-learn's classic ``n_init=10``), seeded, so the keys are reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def kmeans(x: Tensor, k: int, n_init: int = 10, iters: int = 100, seed: int = 0) -> Tensor:
    """Centres ``[min(k, N), D]`` of ``x [N, D]``: Lloyd's algorithm, k-means++ init, best of ``n_init`` runs."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    x = x.detach().double()  # float64: inertia comparisons between restarts must not flip on rounding
    k = min(k, x.shape[0])
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = x[:k], float("inf")
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, generator)
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(dim=1)
            new = torch.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)])
            if torch.allclose(new, centres):
                break
            centres = new
        inertia = float((torch.cdist(x, centres).min(dim=1).values ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best.float()


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centres = [x[first]]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        if float(dist.sum()) <= 0:  # fewer distinct points than centres: repeat one
            nxt = int(torch.randint(x.shape[0], (1,), generator=generator))
        else:
            nxt = int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
        centres.append(x[nxt])
        dist = torch.minimum(dist, ((x - x[nxt]) ** 2).sum(1))
    return torch.stack(centres)


class KMeansRouter(nn.Module):
    """Per-task K-means keys of one modality, stored as buffers (so they travel with the method's state)."""

    def __init__(self, num_tasks: int, dim: int, keys_per_task: int = 5, metric: str = "l1") -> None:
        super().__init__()
        if metric not in ("l1", "l2"):
            raise ValueError(f"routing metric must be l1 or l2, got {metric!r}")
        self.metric = metric
        self.register_buffer("keys", torch.zeros(num_tasks, keys_per_task, dim))
        self.register_buffer("valid", torch.zeros(num_tasks, keys_per_task, dtype=torch.bool))

    @property
    def num_tasks(self) -> int:
        return self.keys.shape[0]

    def fitted_tasks(self) -> int:
        """Number of leading tasks that have keys."""
        has = self.valid.any(dim=1).tolist()
        return has.index(False) if False in has else len(has)

    def fit_task(self, task: int, features: Tensor, seed: int = 0) -> None:
        """K-means keys of task ``task`` from its frozen features ``[N, D]``."""
        centres = kmeans(features.float().cpu(), self.keys.shape[1], seed=seed)
        self.keys[task].zero_()
        self.valid[task] = False
        self.keys[task, : len(centres)] = centres.to(self.keys)
        self.valid[task, : len(centres)] = True

    def distances(self, features: Tensor, num_tasks: int | None = None) -> Tensor:
        """``[B, T]``: each query's distance to the nearest key of each of the first ``num_tasks`` tasks."""
        n = num_tasks or self.fitted_tasks()
        if n < 1 or not bool(self.valid[:n].any(dim=1).all()):
            raise RuntimeError(f"routing needs keys for tasks 0..{n - 1}; fit them after training each task")
        keys = self.keys[:n].reshape(-1, self.keys.shape[-1]).to(features)
        p = 1.0 if self.metric == "l1" else 2.0
        d = torch.cdist(features.float(), keys.float(), p=p).reshape(len(features), n, -1)
        d = d.masked_fill(~self.valid[:n].to(d.device).unsqueeze(0), float("inf"))
        return d.min(dim=2).values

    def route(self, features: Tensor, num_tasks: int | None = None) -> Tensor:
        """The nearest task of each query, ``[B]`` (ties go to the earlier task)."""
        return self.distances(features, num_tasks).argmin(dim=1)
