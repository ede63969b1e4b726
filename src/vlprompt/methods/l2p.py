"""L2P-style prompt pool (Wang et al., CVPR 2022) for continual retrieval.

One pool shared by all tasks: the frozen model's L2-normalised image embedding queries the learned keys by cosine;
the ``top_k`` chosen prompts (``top_k · length`` tokens) are inserted after CLS, after ``ln_pre`` (VPT-style prompt
tuning). Loss: CLIP loss + ``pull_weight`` · L2P's surrogate that draws the chosen keys to the queries. L2P is
vision-only; ``text_pool=True`` adds a pool on the text side, queried by frozen text features. Selection is per
sample at evaluation (L2P's batch-wise majority vote would make a sample's features depend on its batch; it is
available for training as ``batchwise_train``). The pool is shared, so every task trains all of it.
LPI's released L2P baseline does not run (spec section 5); this is a clean re-implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Plans, register_method
from vlprompt.methods.continual import ContinualMethod
from vlprompt.options import count, nonneg
from vlprompt.prompts.pool import PromptPool


@dataclass
class L2POptions:
    num_tasks: int = nonneg(0)  # set by the continual runner (the pool does not depend on it)
    pool_size: int = count(10)  # M (L2P's CIFAR setting: M=10, length 5, top 5)
    length: int = count(5)  # tokens per prompt
    top_k: int = count(5)
    pull_weight: float = nonneg(0.1)  # L2P's surrogate-loss coefficient
    batchwise_train: bool = False  # L2P's batch-wise majority vote during training
    text_pool: bool = False
    init: str = "uniform"  # prompts and keys U(-1, 1), as L2P


@register_method("l2p")
class L2P(ContinualMethod):
    """A key-query prompt pool on the vision side (optionally also on the text side)."""

    Options = L2POptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o, e = self.options, backbone.embed_dim
        self.pool = PromptPool(o.pool_size, o.length, backbone.vision_width, e, o.top_k, init=o.init, key_init=o.init)
        self.text_pool = (
            PromptPool(o.pool_size, o.length, backbone.text_width, e, o.top_k, init=o.init, key_init=o.init)
            if o.text_pool
            else None
        )

    @torch.no_grad()
    def _frozen_text_from_tokens(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.backbone.encode_text(tokens), dim=-1)

    def _image_plan(self, images: Tensor) -> tuple[PromptPlan, Tensor]:
        batchwise = self.options.batchwise_train and self.training
        sel = self.pool(self.frozen_image_features(images), batchwise=batchwise)
        return PromptPlan(insert=sel.prompts[:, 0]), sel.pull_loss

    def _text_plan(self, tokens: Tensor) -> tuple[PromptPlan | None, Tensor]:
        if self.text_pool is None:
            return None, torch.zeros((), device=tokens.device)
        batchwise = self.options.batchwise_train and self.training
        sel = self.text_pool(self._frozen_text_from_tokens(tokens), batchwise=batchwise)
        return PromptPlan(insert=sel.prompts[:, 0]), sel.pull_loss

    def encode_image(self, images: Tensor, plans: Plans | None = None) -> Tensor:
        """Per-sample pool selection unless explicit image plans are given."""
        if plans is not None and plans.image is not None:
            return super().encode_image(images, plans)
        images = images.to(self.backbone.device)
        plan, _ = self._image_plan(images)
        return F.normalize(self.backbone.encode_image(images, plan), dim=-1)

    def encode_text(self, texts: Sequence[str] | Tensor, plans: Plans | None = None) -> Tensor:
        if (plans is not None and plans.text is not None) or self.text_pool is None:
            return super().encode_text(texts, plans)
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        plan, _ = self._text_plan(tokens)
        return F.normalize(self.backbone.encode_text(tokens, plan), dim=-1)

    def forward(self, visual: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """CLIP loss under the selected prompts + the key pull term."""
        plan, pull = self._image_plan(visual.to(self.backbone.device))
        vis = F.normalize(self.backbone.encode_image(visual, plan), dim=-1)
        text_plan, text_pull = self._text_plan(tokens)
        txt = F.normalize(self.backbone.encode_text(tokens, text_plan), dim=-1)
        return self.loss_fn(vis, txt, self.logit_scale) + self.options.pull_weight * (pull + text_pull)
