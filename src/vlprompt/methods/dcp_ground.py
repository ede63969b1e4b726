"""DCP for referring-expression grounding: the ``dcp`` baseline of LPI's grounding benchmark (spec ``lpi.md``
section 5: full-rank depth-1 prompts + ``InteractModule``).

S-Prompts' per-task :class:`~vlprompt.prompts.lpi.FullRankPrompt` (depth 1, N(0, 0.02²), inserted after each tower's
first token) plus LPI's per-task interaction module (:class:`~vlprompt.prompts.lpi.LowRankInteraction`, rank 4, mix
0.1), which mixes the N prompt tokens of both towers of the same image-expression pair before blocks
``1..interact_depth-1`` (``INTERACT_DEPTH`` = 9) through the coupling LPI uses
(:func:`~vlprompt.methods.continual_grounding.prompt_interaction`). With depth-1 prompts those positions hold the
inserted prompt tokens as the blocks have transformed them. The detector's REC loss only (no alignment or task terms);
image routing at evaluation. Trainable per task ``N (Dv + Dt)`` + ``2 r (L_towers + Dv + Dt + 1) + 2 (Dv + Dt)``
= 20,480 + 12,904 = 33,384 at ViT-B/16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlprompt.backbone import Backbone
from vlprompt.backbone.detector import Detector
from vlprompt.errors import ConfigError
from vlprompt.methods.base import register_method
from vlprompt.methods.continual_grounding import interaction_modules
from vlprompt.methods.sprompts_ground import SPromptsGround, SPromptsGroundOptions
from vlprompt.options import count, nonneg


@dataclass
class DCPGroundOptions(SPromptsGroundOptions):
    interact_depth: int = count(9)  # INTERACT_DEPTH: blocks 1..8 are coupled
    interact_rank: int = count(4)  # INTERACT_LORA_D
    interact_mix: float = nonneg(0.1)  # v <- LN((1 - m) v + m v')


@register_method("dcp_ground")
class DCPGround(SPromptsGround):
    """S-Prompts' per-task prompts plus a per-task interaction of the paired towers' prompt tokens."""

    Options = DCPGroundOptions

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options, detector=detector, train_heads=train_heads)
        o = self.options
        towers = min(backbone.vision.num_layers, backbone.text.num_layers)
        if not 1 <= o.interact_depth <= towers:
            raise ConfigError(
                f"dcp_ground.interact_depth must be in 1..{towers} (the towers' depth), got {o.interact_depth}"
            )
        self.interactions = interaction_modules(backbone, self.num_tasks, o.interact_rank, o.interact_mix)
        self.begin_task(0)  # again: the interaction modules exist now

    @property
    def interact_depth(self) -> int:
        """DCP couples deeper than its depth-1 prompts: blocks ``1..interact_depth-1``."""
        return self.options.interact_depth
