"""DualPrompt (Wang et al., ECCV 2022) for class-incremental classification on a frozen CLIP image tower.

A shared G-prompt in ``g_layers`` and one E-prompt per task in ``e_layers``, both prefixes
(:class:`~vlprompt.prompts.dualprompt.DualPromptPrompts`). Training uses the true task's E-prompt (only it, its key,
the G-prompt and the classifier train) with the pull loss ``pull_weight * mean_b (1 - cos(q_b, k_t))`` (CODA's
re-implementation sums over the batch; the mean keeps the weight independent of the batch size). At test time the
seen task whose key is closest to the query (top-1) supplies the E-prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.methods.base import register_method
from vlprompt.methods.cil import CILOptions, ClassIncrementalMethod
from vlprompt.options import count, nonneg, ranged
from vlprompt.prompts.dualprompt import DualPromptPrompts


@dataclass
class DualPromptOptions(CILOptions):
    g_layers: list[int] = ranged(factory=lambda: [0, 1], ge=0)  # G-prompt layers (DualPrompt: 0-1)
    e_layers: list[int] = ranged(factory=lambda: [2, 3, 4], ge=0)  # E-prompt layers (DualPrompt: 2-4)
    g_length: int = count(5)  # prefix tokens per key/value of the G-prompt
    e_length: int = count(20)  # prefix tokens per key/value of an E-prompt (HiDe's config; DualPrompt: 5)
    pull_weight: float = nonneg(1.0)  # key-query matching coefficient
    init: str = "uniform"


@register_method("dualprompt")
class DualPrompt(ClassIncrementalMethod):
    """G-prompt + task-keyed E-prompts; the E-prompt is found by key-query matching at test time."""

    Options = DualPromptOptions
    routes_tasks = True

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o, depth = self.options, backbone.vision.num_layers
        if any(not 0 <= layer < depth for layer in [*o.g_layers, *o.e_layers]):
            raise ValueError(
                f"prompt layers must lie in 0..{depth - 1} (g_layers {o.g_layers}, e_layers {o.e_layers})"
            )
        self.prompts = DualPromptPrompts(self.num_tasks, o.g_layers, o.e_layers, o.g_length, o.e_length,
                                         backbone.vision_width, self.query_dim, o.init)  # fmt: skip

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        self.prompts.e.train_only(task)

    def trainable_parameters(self) -> list[nn.Parameter]:
        t, e = self.current_task, self.prompts.e
        shared = [self.prompts.g] if self.prompts.g is not None else []
        head = list(self.head.parameters()) if self.head is not None else []
        return [e.prompts[t], e.keys[t], *shared, *head]

    def route(self, query: Tensor) -> Tensor:
        """Top-1 key among the seen tasks."""
        sim = self.prompts.e.key_similarity(query.to(self.backbone.device), self.current_task + 1)
        return sim.argmax(dim=-1)

    def features(self, images: Tensor, query: Tensor, tasks: Tensor | None) -> tuple[Tensor, Tensor]:
        query = query.to(self.backbone.device)
        aux = torch.zeros((), device=query.device)
        if tasks is None:
            tasks = self.route(query)
        elif self.training:
            key = self.prompts.e.keys[self.current_task]
            aux = self.options.pull_weight * (1.0 - F.cosine_similarity(query, key[None], dim=-1)).mean()
        return self.encode_prompted(images, self.prompts.plan(tasks.to(query.device))), aux

    @torch.no_grad()
    def predict(self, images: Tensor, query: Tensor, tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        routed = self.route(query) if tasks is None else tasks.to(self.backbone.device)
        z, _ = self.features(images, query, routed)
        return self.eval_logits(z)[:, : self.seen_classes(self.current_task)], routed
