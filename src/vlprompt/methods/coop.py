"""CoOp (Zhou et al., IJCV 2022): learned text context before every caption or class name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.options import count
from vlprompt.prompts import TextContext


@dataclass
class CoOpOptions:
    n_ctx: int = count(4)
    ctx_init: str = "a photo of a"  # words whose embeddings initialise the context ("" = random N(0, 0.02²))


@register_method("coop")
class CoOp(Method):
    """``n_ctx`` learned vectors replace placeholder words at text layer 0; everything else is frozen."""

    Options = CoOpOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        init = self.word_embeddings(o.ctx_init, o.n_ctx) if o.ctx_init else None
        self.context = TextContext(o.n_ctx, backbone.text_width, init)
        self.n_placeholders = o.n_ctx

    def plans(self) -> Plans:
        return Plans(text=PromptPlan(replace={0: self.context()}))
