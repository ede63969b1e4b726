"""VPT-deep (Jia et al., ECCV 2022): learned visual tokens at every layer of the image tower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.options import count, nonneg
from vlprompt.prompts import DeepPrompts, vpt_init_range


@dataclass
class VPTOptions:
    n_tokens: int = count(8)
    depth: int = nonneg(0)  # layers with their own prompts; 0 = every layer (VPT-deep), 1 = VPT-shallow


@register_method("vpt")
class VPTDeep(Method):
    """Prompt tokens inserted after CLS before block 0 and replaced before each later block up to ``depth``."""

    Options = VPTOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        depth = o.depth or backbone.vision.num_layers
        if not 1 <= depth <= backbone.vision.num_layers:
            raise ValueError(f"vpt.depth must be in 1..{backbone.vision.num_layers}, got {depth}")
        patch = backbone.vision.visual.patch_size[0]
        self.prompts = DeepPrompts(
            depth, o.n_tokens, backbone.vision_width, vpt_init_range(patch, backbone.vision_width)
        )

    def plans(self) -> Plans:
        tokens = self.prompts()
        plan = PromptPlan(insert=tokens[0], replace={layer: tokens[layer] for layer in range(1, len(tokens))})
        return Plans(image=plan)
