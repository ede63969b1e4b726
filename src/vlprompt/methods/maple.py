"""MaPLe-style coupled prompts (Khattak et al., CVPR 2023): text prompts projected into the vision tower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.options import count
from vlprompt.prompts import CoupledPrompts


@dataclass
class MaPLeOptions:
    n_ctx: int = count(2)
    depth: int = count(9)  # prompt depth J (MaPLe's default); capped at the towers' depth
    ctx_init: str = "a photo of a"


@register_method("maple")
class MaPLe(Method):
    """Deep text prompts at layers ``0..J-1``; each layer's vision prompts are a linear map of its text prompts.

    As in MaPLe's code, the first vision prompts are inserted before ``ln_pre`` and deeper ones replace them.
    """

    Options = MaPLeOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        depth = min(o.depth, backbone.vision.num_layers, backbone.text.num_layers)
        init = self.word_embeddings(o.ctx_init, o.n_ctx) if o.ctx_init else None
        self.prompts = CoupledPrompts(depth, o.n_ctx, backbone.text_width, backbone.vision_width, init)
        self.n_placeholders = o.n_ctx

    def plans(self) -> Plans:
        text, vision = self.prompts()
        text_plan = PromptPlan(replace={layer: t for layer, t in enumerate(text)})
        vision_plan = PromptPlan(
            insert=vision[0],
            replace={layer: v for layer, v in enumerate(vision) if layer > 0},
            insert_before_ln_pre=True,
        )
        return Plans(image=vision_plan, text=text_plan)
