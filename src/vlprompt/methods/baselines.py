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
        towers = ("both", "vision", "text")
        if self.options.tower not in towers:
            raise ValueError(f"finetune.tower must be one of {towers}, got {self.options.tower!r}")
        for name, p in model.named_parameters():
            in_vision = name.startswith("visual.")
            if self.options.tower == "both" or (self.options.tower == "vision") == in_vision:
                p.requires_grad_(True)
        model.logit_scale.requires_grad_(self.options.train_logit_scale)

    @property
    def logit_scale(self) -> Tensor:
        return self.backbone.model.logit_scale.exp().clamp(max=100.0)
