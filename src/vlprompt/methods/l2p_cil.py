"""L2P (Wang et al., CVPR 2022) for class-incremental classification on a frozen CLIP image tower.

One prompt pool shared by all tasks (:class:`~vlprompt.prompts.pool.PromptPool`): the frozen query ``q`` picks the
``top_k`` prompts of highest ``cos(q, key)``; their prefixes are concatenated along the token axis and prefixed to
keys and values in ``layers`` (the prefix-tuning form of CODA-Prompt's L2P++, layer 0 only as in L2P). Loss: masked
cross-entropy + ``pull_weight`` * L2P's surrogate ``sum_k (1 - cos(q, key_k))``. Selection is per sample at test
time (L2P's batch-wise majority vote would make a sample's prediction depend on its batch; ``batchwise_train`` uses it
during training). The pool is shared, so every task trains all of it: L2P has no per-task prompt to protect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlprompt.backbone import Backbone
from vlprompt.methods.base import register_method
from vlprompt.methods.cil import CILOptions, ClassIncrementalMethod
from vlprompt.options import count, nonneg, ranged
from vlprompt.prompts.dualprompt import prefix_plan
from vlprompt.prompts.pool import PromptPool


@dataclass
class L2PCILOptions(CILOptions):
    pool_size: int = count(10)  # M (L2P: 10; CODA's L2P++: 30)
    length: int = count(5)  # prefix tokens per key and per value of one prompt (L2P: Lp = 5)
    top_k: int = count(5)  # prompts chosen per sample (L2P: 5)
    layers: list[int] = ranged(factory=lambda: [0], ge=0)  # L2P prompts the first layer only
    pull_weight: float = nonneg(0.1)  # L2P's surrogate-loss coefficient
    batchwise_train: bool = False
    init: str = "uniform"  # prompts and keys U(-1, 1), as L2P


@register_method("l2p_cil")
class L2PCIL(ClassIncrementalMethod):
    """A key-query prefix-prompt pool shared by every task."""

    Options = L2PCILOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if not o.layers or max(o.layers) >= backbone.vision.num_layers:
            raise ValueError(f"prompt layers {list(o.layers)} must lie in 0..{backbone.vision.num_layers - 1}")
        # one pool "layer" slot per (layer, key|value): gather() then yields [B, 2L, k*n, D]
        self.pool = PromptPool(o.pool_size, o.length, backbone.vision_width, self.query_dim, o.top_k,
                               layers=2 * len(o.layers), init=o.init, key_init=o.init)  # fmt: skip

    def features(self, images: Tensor, query: Tensor, tasks: Tensor | None) -> tuple[Tensor, Tensor]:
        """``z`` under the selected prompts; the pull term is the auxiliary loss (training only)."""
        o = self.options
        sel = self.pool(query.to(self.backbone.device), batchwise=o.batchwise_train and self.training)
        b, _, n, d = sel.prompts.shape
        plan = prefix_plan(o.layers, sel.prompts.view(b, len(o.layers), 2, n, d))
        aux = o.pull_weight * sel.pull_loss if self.training else torch.zeros((), device=query.device)
        return self.encode_prompted(images, plan), aux
