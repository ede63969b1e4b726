"""MaPLe-style prompts for referring-expression grounding: the ``maple`` baseline of LPI's grounding benchmark (spec
``lpi.md`` section 5, ``MaPLePrompt``).

Per task a :class:`~vlprompt.prompts.deep.CoupledPrompts` (the retrieval ``maple`` module, without word init): at each
of ``depth`` = 9 layers a text prompt ``[N, Dt]`` (N(0, 0.02²)) and a ``Linear(Dt -> Dv)`` that maps it to that
layer's vision prompt. Slice 0 is inserted after each tower's first token, slices ``1..depth-1`` *replace* those
positions before their blocks (``deep_mode = "replace"``); no extra losses, no interaction; image routing at
evaluation. Trainable per task ``depth (N Dt + Dt Dv + Dv)`` (spec section 7's formula; its GLIP row, 768 -> 96, is
775,008): 9 · (16·512 + 512·768 + 768) = 3,619,584 at ViT-B/16, almost all in the couplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.backbone.detector import Detector
from vlprompt.methods.base import register_method
from vlprompt.methods.continual_grounding import TaskGroundingMethod, TaskGroundingOptions
from vlprompt.options import count
from vlprompt.prompts.deep import CoupledPrompts


@dataclass
class MaPLeGroundOptions(TaskGroundingOptions):
    depth: int = count(9)  # PROMPT_DEPTH: a text prompt and a coupler per layer 0..8


@register_method("maple_ground")
class MaPLeGround(TaskGroundingMethod):
    """Per-task coupled prompts (vision = per-layer linear map of the text prompts) replacing at deeper layers."""

    Options = MaPLeGroundOptions
    deep_mode = "replace"

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options, detector=detector, train_heads=train_heads)
        o = self.options
        self.prompts = nn.ModuleList(
            CoupledPrompts(o.depth, o.n_tokens, backbone.text_width, backbone.vision_width)
            for _ in range(self.num_tasks)
        )
        self.begin_task(0)

    def task_prompts(self, task: int) -> tuple[Tensor, Tensor]:
        """``(P_v [depth, N, Dv], P_t [depth, N, Dt])``: each layer's text prompt and its linear image."""
        text, vision = self.prompts[task]()
        return torch.stack(vision), torch.stack(text)
