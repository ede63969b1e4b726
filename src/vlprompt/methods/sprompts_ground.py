"""S-Prompts for referring-expression grounding: the ``sprompt`` baseline of LPI's grounding benchmark (spec ``lpi.md``
section 5: ``NormalPrompt``, depth 1, additive, no losses).

Per task one :class:`~vlprompt.prompts.lpi.FullRankPrompt` (the retrieval ``sprompts`` module): free vision
``[1, N, Dv]`` and text ``[1, N, Dt]`` tokens, N(0, 0.02²), inserted after each tower's first token (see
:mod:`~vlprompt.methods.continual_grounding`); the detector's REC loss only; each image routed to a task by its frozen
features at evaluation. Trainable per task ``depth · N (Dv + Dt)`` = 16 · (768 + 512) = 20,480 at ViT-B/16 (spec
section 7's S-Prompts row). ``depth > 1`` adds deeper free slices (not LPI's baseline, which is depth 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vlprompt.backbone import Backbone
from vlprompt.backbone.detector import Detector
from vlprompt.methods.base import register_method
from vlprompt.methods.continual_grounding import TaskGroundingMethod, TaskGroundingOptions
from vlprompt.options import nonneg
from vlprompt.prompts.lpi import FullRankPrompt


@dataclass
class SPromptsGroundOptions(TaskGroundingOptions):
    init_std: float = nonneg(0.02)  # NormalPrompt's N(0, 0.02²)


@register_method("sprompts_ground")
class SPromptsGround(TaskGroundingMethod):
    """A full-rank prompt pair per task on the detector; only the current task's pair trains; image routing."""

    Options = SPromptsGroundOptions

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options, detector=detector, train_heads=train_heads)
        o = self.options
        self.prompts = nn.ModuleList(
            FullRankPrompt(o.depth, o.n_tokens, backbone.vision_width, backbone.text_width, o.init_std)
            for _ in range(self.num_tasks)
        )
        self.begin_task(0)
