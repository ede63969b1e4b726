"""Generic baselines every paper compares against: zero-shot CLIP and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vlprompt.backbone import Backbone
from vlprompt.methods.base import Method, register_method


@register_method("zeroshot")
class ZeroShot(Method):
    """Frozen CLIP: nothing trains."""


@dataclass
class FinetuneOptions:
    train_logit_scale: bool = True  # open_clip's training recipe learns the temperature too
    tower: str = "both"  # both | vision | text


@register_method("finetune")
class FullFinetune(Method):
    """Full fine-tuning of CLIP (both towers, or one) with the contrastive loss."""

    Options = FinetuneOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        model = self.backbone.model
        groups = {"both": [model], "vision": [model.visual], "text": [m for n, m in model.named_children() if n != "visual"]}
        if self.options.tower not in groups:
            raise ValueError(f"finetune.tower must be one of {sorted(groups)}, got {self.options.tower!r}")
        for module in groups[self.options.tower]:
            for p in module.parameters():
                p.requires_grad_(True)
        model.logit_scale.requires_grad_(self.options.train_logit_scale)

    @property
    def logit_scale(self) -> Tensor:
        return self.backbone.model.logit_scale.exp().clamp(max=100.0)
