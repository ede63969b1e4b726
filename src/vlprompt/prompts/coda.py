"""CODA-Prompt (Smith et al., CVPR 2023): attention-weighted sums of prompt components, grown task by task.

Each prompted layer ``l`` holds ``M`` components: a prefix ``P_m [2, n, D]``, a key ``K_m`` and an attention vector
``A_m`` (both ``[Dk]``). For a query ``q`` the weights are ``alpha_m = cos(q * A_m, K_m)`` and the layer's prefix is
``sum_m alpha_m P_m``. The pool is split into ``M / T`` components per task: task ``t`` trains only its own chunk
(chunks ``< t`` are frozen, chunks ``> t`` unused), and its chunk starts Gram-Schmidt-orthogonal to the earlier ones
(CODA re-initialises the new components as orthonormal vectors). The optional orthogonality penalty is
``mean((M M^T - I)^2)`` over the used components of ``K``, ``A`` and flattened ``P``, per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gram_schmidt_extend(previous: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` unit vectors ``[count, D]`` orthogonal to the rows of ``previous [P, D]`` and to each other.

    Random normal starting vectors, classical Gram-Schmidt (twice, for float stability). Needs ``P + count <= D``.
    """
    dim = previous.shape[-1]
    if previous.shape[0] + count > dim:
        raise ValueError(f"cannot fit {previous.shape[0] + count} orthogonal components in dimension {dim}; "
                         "use fewer components per task (method.pool_size) or a longer key/prompt")  # fmt: skip
    basis = [F.normalize(v, dim=0) for v in previous.detach().double().cpu()]  # on the CPU, like the generator
    out = []
    for _ in range(count):
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
        for _ in range(2):
            for b in basis:
                v = v - (v @ b) * b
        v = F.normalize(v, dim=0)
        basis.append(v)
        out.append(v)
    return torch.stack(out).to(previous.dtype)


def ortho_penalty(m: Tensor) -> Tensor:
    """``mean((M M^T - I)^2)`` of the rows of ``m [N, D]``."""
    gram = m @ m.T
    return ((gram - torch.eye(m.shape[0], device=m.device, dtype=m.dtype)) ** 2).mean()


class CodaPromptPool(nn.Module):
    """``pool_size`` components per prompted layer, ``floor(pool_size / num_tasks)`` owned by each task."""

    def __init__(self, num_tasks: int, pool_size: int, num_layers: int, length: int, width: int, key_dim: int) -> None:
        super().__init__()
        if pool_size < num_tasks:
            raise ValueError(f"pool_size {pool_size} gives no component to some of the {num_tasks} tasks")
        self.per_task = pool_size // num_tasks  # CODA's int(pool_size / n_tasks); a remainder stays unused
        m = self.per_task
        # Chunk t of every tensor is its own Parameter: freezing earlier tasks is exact, not a detach convention.
        self.p = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_layers, m, 2, length, width)) for _ in range(num_tasks)]
        )
        self.k = nn.ParameterList([nn.Parameter(torch.zeros(num_layers, m, key_dim)) for _ in range(num_tasks)])
        self.a = nn.ParameterList([nn.Parameter(torch.zeros(num_layers, m, key_dim)) for _ in range(num_tasks)])

    @property
    def num_tasks(self) -> int:
        return len(self.p)

    @torch.no_grad()
    def begin_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Gram-Schmidt-initialise task ``task``'s chunk against chunks ``< task``; only that chunk trains."""
        for params in (self.p, self.k, self.a):
            new = params[task]
            for layer in range(new.shape[0]):
                prev = (
                    torch.cat([params[j][layer].flatten(1) for j in range(task)])
                    if task
                    else new[layer][:0].flatten(1)
                )
                new[layer].copy_(gram_schmidt_extend(prev, self.per_task, generator).view_as(new[layer]))
            for j, p in enumerate(params):
                p.requires_grad_(j == task)

    def used(self, num_seen: int) -> tuple[Tensor, Tensor, Tensor]:
        """Components of tasks ``0 .. num_seen - 1``: P ``[L, M', 2, n, D]``, K and A ``[L, M', Dk]``."""
        cat = lambda ps: torch.cat(list(ps)[:num_seen], dim=1)  # noqa: E731
        return cat(self.p), cat(self.k), cat(self.a)

    def forward(self, query: Tensor, num_seen: int) -> tuple[Tensor, Tensor]:
        """Prefixes ``[B, L, 2, n, D]`` for ``query [B, Dk]`` from the first ``num_seen`` tasks' components, and the
        weights ``alpha [B, L, M']``."""
        p, k, a = self.used(num_seen)
        attended = query[:, None, None, :] * a.unsqueeze(0)  # [B, L, M', Dk]
        alpha = (F.normalize(attended, dim=-1) * F.normalize(k, dim=-1).unsqueeze(0)).sum(-1)
        return torch.einsum("blm,lmknd->blknd", alpha, p), alpha

    def orthogonality(self, num_seen: int) -> Tensor:
        """CODA's penalty over the used components: summed over K, A and P, averaged over layers."""
        p, k, a = self.used(num_seen)
        terms = [ortho_penalty(k[i]) + ortho_penalty(a[i]) + ortho_penalty(p[i].flatten(1)) for i in range(len(p))]
        return torch.stack(terms).mean()
