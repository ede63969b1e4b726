"""Key-query prompt pools (L2P, Wang et al. CVPR 2022), written to serve DualPrompt- and CODA-style methods too.

A pool holds ``M`` learned keys ``[M, Dk]`` and ``M`` prompts ``[M, layers, length, width]``. A query (usually a
frozen model's feature of the input) picks the ``top_k`` keys of highest cosine similarity; the chosen prompts are
concatenated along the token axis. ``allowed`` restricts the candidates (DualPrompt trains task ``t`` with its own
prompt only: ``allowed = [t]``); ``batchwise`` applies L2P's majority vote over the batch (training only here: at
evaluation it would make a sample's features depend on its batch). ``pull_loss`` is L2P's surrogate term that draws
the chosen keys to their queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PoolSelection:
    """What one query batch selected: prompts ``[B, layers, k·length, width]``, indices ``[B, k]``, similarities."""

    prompts: Tensor
    indices: Tensor
    similarity: Tensor  # [B, M] cosine similarity of every query to every key
    pull_loss: Tensor  # mean over the batch of Σ_k (1 - cos(query, chosen key))


class PromptPool(nn.Module):
    """``pool_size`` keys and prompts; :meth:`forward` selects the ``top_k`` prompts per query."""

    def __init__(
        self,
        pool_size: int,
        length: int,
        width: int,
        key_dim: int,
        top_k: int = 1,
        layers: int = 1,
        init: str = "uniform",
        key_init: str = "uniform",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be in 1..pool_size={pool_size}, got {top_k}")
        self.top_k = top_k
        self.prompts = nn.Parameter(_init(torch.empty(pool_size, layers, length, width), init))
        self.keys = nn.Parameter(_init(torch.empty(pool_size, key_dim), key_init))

    @property
    def pool_size(self) -> int:
        return self.prompts.shape[0]

    @property
    def length(self) -> int:
        return self.prompts.shape[2]

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarity ``[B, M]`` of queries ``[B, Dk]`` to every key."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def select(
        self, similarity: Tensor, top_k: int | None = None, allowed: Sequence[int] | Tensor | None = None,
        batchwise: bool = False,
    ) -> Tensor:  # fmt: skip
        """Indices ``[B, k]`` of the best keys per query."""
        k = top_k or self.top_k
        sim = similarity
        if allowed is not None:
            keep = torch.zeros(self.pool_size, dtype=torch.bool, device=sim.device)
            keep[torch.as_tensor(allowed, device=sim.device, dtype=torch.long)] = True
            if int(keep.sum()) < k:
                raise ValueError(f"only {int(keep.sum())} allowed prompts for top_k={k}")
            sim = sim.masked_fill(~keep, float("-inf"))
        idx = torch.topk(sim, k, dim=-1).indices
        if batchwise:  # L2P: the k prompts chosen most often in the batch serve every sample
            counts = torch.bincount(idx.flatten(), minlength=self.pool_size).float()
            counts = counts - 1e-3 * torch.arange(self.pool_size, device=counts.device)  # stable tie-break
            idx = torch.topk(counts, k).indices.sort().values.expand(sim.shape[0], -1)
        return idx

    def gather(self, indices: Tensor) -> Tensor:
        """Prompts of ``indices [B, k]``, concatenated per sample: ``[B, layers, k·length, width]``."""
        chosen = self.prompts[indices]  # [B, k, layers, length, width]
        b, k, layers, length, width = chosen.shape
        return chosen.permute(0, 2, 1, 3, 4).reshape(b, layers, k * length, width)

    def forward(
        self, query: Tensor, top_k: int | None = None, allowed: Sequence[int] | Tensor | None = None,
        batchwise: bool = False,
    ) -> PoolSelection:  # fmt: skip
        """Select and gather prompts for ``query [B, Dk]``."""
        sim = self.similarity(query)
        idx = self.select(sim.detach(), top_k, allowed, batchwise)
        pull = (1.0 - sim.gather(1, idx)).sum(dim=1).mean()
        return PoolSelection(self.gather(idx), idx, sim, pull)


def _init(t: Tensor, how: str) -> Tensor:
    if how == "uniform":  # L2P's default (U(-1, 1))
        return nn.init.uniform_(t, -1.0, 1.0)
    if how == "zero":
        return nn.init.zeros_(t)
    if how.startswith("normal"):  # "normal" (std 0.02) or "normal:0.1"
        std = float(how.split(":", 1)[1]) if ":" in how else 0.02
        return nn.init.normal_(t, std=std)
    raise ValueError(f"unknown prompt-pool init {how!r}; use uniform, zero, normal or normal:STD")
