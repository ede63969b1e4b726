"""Learned context and deep prompts: CoOp, VPT-deep and MaPLe-style coupled prompts."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TextContext(nn.Module):
    """CoOp's learned text context: ``n`` vectors that replace placeholder tokens after start-of-text.

    Initialised from the word embeddings of ``init_words`` (e.g. "a photo of a") when given, else
    N(0, 0.02²) as in CoOp. Shape ``[n, D]``.
    """

    def __init__(self, n_ctx: int, width: int, init: Tensor | None = None, std: float = 0.02) -> None:
        super().__init__()
        if init is not None:
            if init.shape != (n_ctx, width):
                raise ValueError(f"context init has shape {tuple(init.shape)}, expected {(n_ctx, width)}")
            ctx = init.detach().clone().float()
        else:
            ctx = torch.randn(n_ctx, width) * std
        self.ctx = nn.Parameter(ctx)

    def forward(self) -> Tensor:
        return self.ctx


def vpt_init_range(patch_size: int, width: int) -> float:
    """VPT's uniform init bound, ``sqrt(6 / (3·patch² + D))`` (Xavier on the patch embedding)."""
    return math.sqrt(6.0 / float(3 * patch_size * patch_size + width))


class DeepPrompts(nn.Module):
    """One set of ``n`` prompt tokens per layer, ``[depth, n, D]`` (VPT-deep / deep text prompts)."""

    def __init__(self, depth: int, n_tokens: int, width: int, init_range: float | None = None, std: float = 0.02):
        super().__init__()
        data = torch.empty(depth, n_tokens, width)
        if init_range is not None:
            nn.init.uniform_(data, -init_range, init_range)
        else:
            nn.init.normal_(data, std=std)
        self.tokens = nn.Parameter(data)

    @property
    def depth(self) -> int:
        return self.tokens.shape[0]

    def forward(self) -> Tensor:
        return self.tokens


class CoupledPrompts(nn.Module):
    """MaPLe-style coupled prompts: deep text prompts and a linear coupling into the vision tower.

    Layer 0's text prompts are the learned context (``ctx``); layers ``1..depth-1`` have their own text
    prompts. Every layer's vision prompts are ``W_l · text_l + b_l``, so the two branches stay coupled.
    """

    def __init__(self, depth: int, n_ctx: int, text_width: int, vision_width: int, ctx_init: Tensor | None = None):
        super().__init__()
        self.ctx = TextContext(n_ctx, text_width, ctx_init)
        self.deep_text = DeepPrompts(depth - 1, n_ctx, text_width) if depth > 1 else None
        self.couplers = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.couplers)

    def forward(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer ``(text_prompts, vision_prompts)``, each a list of ``[n, D]`` tensors."""
        text = [self.ctx()]
        if self.deep_text is not None:
            text.extend(self.deep_text().unbind(0))
        vision = [proj(t) for proj, t in zip(self.couplers, text)]
        return text, vision
