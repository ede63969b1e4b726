"""The prompt plan: a declarative description of what a prompt method does to a tower.

Every prompt method in vlprompt (CoOp, VPT, MaPLe, LPI, DGL, the L2P family, ...) is expressed as one
of these plans, so the towers need to know nothing about methods. Token tensors are either shared
across the batch, shape ``[n, D]``, or per sample, shape ``[B, n, D]``.

Layer numbering: layer ``l`` means "the input of block ``l``". Layer 0 is special for text: a
``replace`` at layer 0 overwrites *token embeddings* before the positional embedding is added (CoOp's
learned context); everywhere else operations act on hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PromptPlan:
    """What to insert, replace, add or prefix at which layer of one tower.

    Attributes:
        insert: tokens inserted once before block 0 at positions ``[start, start + n)`` (VPT, MaPLe
            and LPI visual prompts go right after CLS). They get no positional embedding.
        replace: ``layer -> tokens`` overwriting positions ``[start, start + n)`` before that block
            (VPT-deep, MaPLe deep prompts; CoOp context at text layer 0).
        add: ``layer -> tokens`` added to positions ``[start, start + n)`` (LPI's additive deep prompts).
        prefix: ``layer -> (keys, values)``: prefix-tuning tokens in the attention's projected space,
            prepended to keys and values only (L2P, DualPrompt, CODA-Prompt); ``[n, D]`` or ``[B, n, D]``.
        attn_mask: extra mask over the final sequence (after insertion): bool (True = may attend) or
            additive float, shape ``[L, L]`` or ``[B, L, L]``; combined with the tower's own mask.
        start: first position the prompt tokens occupy (1 = right after CLS / start-of-text).
        insert_before_ln_pre: vision only; insert before ``ln_pre`` as MaPLe/IVLP do (after it by default,
            as VPT, LPI and DGL do).
        global_tokens: vision with frame input only; video-level tokens ``[G, D]`` or ``[B, G, D]`` inserted once
            before block 0, under DGL's global-local attention: frame tokens see their own frame and the
            globals, globals see every frame of their video.
    """

    insert: Tensor | None = None
    replace: dict[int, Tensor] = field(default_factory=dict)
    add: dict[int, Tensor] = field(default_factory=dict)
    prefix: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    attn_mask: Tensor | None = None
    start: int = 1
    insert_before_ln_pre: bool = False
    global_tokens: Tensor | None = None

    @property
    def num_inserted(self) -> int:
        """How many tokens the plan inserts."""
        return 0 if self.insert is None else self.insert.shape[-2]

    def is_empty(self) -> bool:
        """True when the plan changes nothing."""
        return self.insert is None and not self.replace and not self.add and not self.prefix and self.attn_mask is None

    def max_layer(self) -> int:
        """Deepest layer the plan touches (-1 for none)."""
        layers = [*self.replace, *self.add, *self.prefix]
        return max(layers, default=0 if self.insert is not None else -1)


def batched(tokens: Tensor, batch: int) -> Tensor:
    """Broadcast ``[n, D]`` or ``[1, n, D]`` tokens to ``[batch, n, D]`` (no copy)."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] not in (1, batch):
        raise ValueError(f"prompt tokens have batch {tokens.shape[0]}, the input has {batch}")
    return tokens.expand(batch, -1, -1)


def write_tokens(x: Tensor, tokens: Tensor, start: int, mode: str) -> Tensor:
    """Return ``x`` with ``tokens`` replacing (``mode='replace'``) or added to (``'add'``) a span."""
    n = tokens.shape[-2]
    if start + n > x.shape[1]:
        raise ValueError(f"prompt span [{start}, {start + n}) exceeds sequence length {x.shape[1]}")
    tokens = batched(tokens.to(x.dtype), x.shape[0])
    middle = tokens if mode == "replace" else x[:, start : start + n] + tokens
    # torch.cat rather than in-place slicing keeps autograd simple and never mutates a caller's tensor
    return torch.cat([x[:, :start], middle, x[:, start + n :]], dim=1)


def insert_tokens(x: Tensor, tokens: Tensor, start: int) -> Tensor:
    """Insert ``tokens`` into ``x`` at position ``start``."""
    tokens = batched(tokens.to(x.dtype), x.shape[0])
    return torch.cat([x[:, :start], tokens, x[:, start:]], dim=1)
