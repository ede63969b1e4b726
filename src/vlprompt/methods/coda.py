"""CODA-Prompt (Smith et al., CVPR 2023) for class-incremental classification on a frozen CLIP image tower.

The prefix of every prompted layer is an attention-weighted sum of prompt components
(:class:`~vlprompt.prompts.coda.CodaPromptPool`): ``alpha_m = cos(q * A_m, K_m)``, prefix ``= sum_m alpha_m P_m``.
Task ``t`` adds and trains its own ``pool_size / T`` components (Gram-Schmidt-initialised against the earlier ones,
which stay frozen); it uses the components of tasks ``0..t`` both in training and at test time, so no task id is
ever chosen. Loss: masked cross-entropy + ``ortho_weight`` * the orthogonality penalty on K, A and P.
CODA's code multiplies its ``ortho_mu`` (0.1 in the CIFAR/ImageNet-R scripts) by ``1e-6`` inside the penalty; the
default ``ortho_weight = 1e-7`` is that product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.methods.base import register_method
from vlprompt.methods.cil import CILOptions, ClassIncrementalMethod
from vlprompt.options import count, nonneg, ranged
from vlprompt.prompts.coda import CodaPromptPool
from vlprompt.prompts.dualprompt import prefix_plan


@dataclass
class CodaOptions(CILOptions):
    pool_size: int = count(100)  # components per layer (CODA: 100 for 10 tasks, 10 per task)
    length: int = count(4)  # prefix tokens per key/value of a component (CODA: e_p_length 8 = 4 + 4)
    layers: list[int] = ranged(factory=lambda: [0, 1, 2, 3, 4], ge=0)
    ortho_weight: float = nonneg(1e-7)  # CODA's ortho_mu 0.1 x its internal 1e-6


@register_method("coda_prompt")
class CodaPrompt(ClassIncrementalMethod):
    """Attention-weighted component prompts, grown and frozen task by task."""

    Options = CodaOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if not o.layers or max(o.layers) >= backbone.vision.num_layers:
            raise ValueError(f"prompt layers {list(o.layers)} must lie in 0..{backbone.vision.num_layers - 1}")
        self.pool = CodaPromptPool(self.num_tasks, o.pool_size, len(o.layers), o.length, backbone.vision_width,
                                   self.query_dim)  # fmt: skip

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        self.pool.begin_task(task)  # global RNG: seeded by the run, restored on resume

    def trainable_parameters(self) -> list[nn.Parameter]:
        t = self.current_task
        head = list(self.head.parameters()) if self.head is not None else []
        return [self.pool.p[t], self.pool.k[t], self.pool.a[t], *head]

    def features(self, images: Tensor, query: Tensor, tasks: Tensor | None) -> tuple[Tensor, Tensor]:
        seen = self.current_task + 1
        prefix, _ = self.pool(query.to(self.backbone.device), seen)
        aux = torch.zeros((), device=prefix.device)
        if self.training and self.options.ortho_weight > 0:
            aux = self.options.ortho_weight * self.pool.orthogonality(seen)
        return self.encode_prompted(images, prefix_plan(self.options.layers, prefix)), aux
