"""The prompt plan: a declarative description of what a prompt method does to a tower.

Every prompt method in vlprompt (CoOp, VPT, MaPLe, LPI, DGL, the L2P family, ...) is expressed as one
of these plans, so the towers need to know nothing about methods. Token tensors are either shared
across the batch, shape ``[n, D]``, or per sample, shape ``[B, n, D]``.

Layer numbering: layer ``l`` means "the input of block ``l``". Layer 0 is special for text: a
``replace`` at layer 0 overwrites *token embeddings* before the positional embedding is added (CoOp's
learned context); everywhere else operations act on hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
        start: first position the prompt tokens occupy; None (the default) is the tower's first content position:
            right after CLS for vision, the first word for text (1 after a start-of-text token, 0 where the
            tokenizer has none, as SigLIP's).
        insert_before_ln_pre: vision only; insert before ``ln_pre`` as MaPLe/IVLP do (after it by default,
            as VPT, LPI and DGL do).
        suffix: text only; ``layer -> tokens`` placed right before each row's end-of-text token: inserted at
            layer 0 (after the positional embedding), replaced before later blocks. Unlike tokens after the
            end-of-text token, these reach the pooled output under the causal mask (DGL's postfix prompts).
        global_tokens: vision with frame input only; video-level tokens ``[G, D]`` or ``[B, G, D]`` inserted once
            before block 0, under DGL's global-local attention: frame tokens see their own frame and the
            globals, globals see every frame of their video.
    """

    insert: Tensor | None = None
    replace: dict[int, Tensor] = field(default_factory=dict)
    add: dict[int, Tensor] = field(default_factory=dict)
    prefix: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    attn_mask: Tensor | None = None
    start: int | None = None
    insert_before_ln_pre: bool = False
    suffix: dict[int, Tensor] = field(default_factory=dict)
    global_tokens: Tensor | None = None

    @property
    def num_inserted(self) -> int:
        """How many tokens the plan inserts."""
        return 0 if self.insert is None else self.insert.shape[-2]

    def is_empty(self) -> bool:
        """True when the plan changes nothing."""
        return self.insert is None and not self.replace and not self.add and not self.prefix and self.attn_mask is None

    def at(self, first_position: int) -> PromptPlan:
        """This plan with ``start`` resolved: ``first_position`` (the tower's) unless the plan sets its own."""
        return self if self.start is not None else replace(self, start=first_position)

    def max_layer(self) -> int:
        """Deepest layer the plan touches (-1 for none)."""
        layers = [*self.replace, *self.add, *self.prefix, *self.suffix]
        return max(layers, default=0 if self.insert is not None else -1)


def batched(tokens: Tensor, batch: int) -> Tensor:
    """Broadcast ``[n, D]`` or ``[1, n, D]`` tokens to ``[batch, n, D]`` (no copy), or tile ``[T, n, D]``."""
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] == batch or tokens.shape[0] == 1:
        return tokens.expand(batch, -1, -1)
    if batch % tokens.shape[0] == 0:  # per-frame tokens [T, n, D] for frames batched as B*T (frame-major)
        return tokens.repeat(batch // tokens.shape[0], 1, 1)
    raise ValueError(f"prompt tokens have batch {tokens.shape[0]}, the input has {batch}")


def write_tokens(x: Tensor, tokens: Tensor, start: int, mode: str) -> Tensor:
    """Return ``x`` with ``tokens`` replacing (``mode='replace'``) or added to (``'add'``) a span."""
    n = tokens.shape[-2]
    if start + n > x.shape[1]:
        raise ValueError(f"prompt span [{start}, {start + n}) exceeds sequence length {x.shape[1]}")
    tokens = batched(tokens.to(x.dtype), x.shape[0])
    middle = tokens if mode == "replace" else x[:, start : start + n] + tokens
    # torch.cat rather than in-place slicing keeps autograd simple and never mutates a caller's tensor
    return torch.cat([x[:, :start], middle, x[:, start + n :]], dim=1)


def _span_index(x: Tensor, starts: Tensor, n: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row span bookkeeping: positions ``[N, length]``, offsets into the span, and whether inside it."""
    idx = torch.arange(length, device=x.device).unsqueeze(0)
    rel = idx - starts.unsqueeze(1)
    return idx, rel.clamp(0, n - 1), (rel >= 0) & (rel < n)


def insert_tokens_at(x: Tensor, tokens: Tensor, starts: Tensor) -> Tensor:
    """Insert shared ``tokens [n, D]`` into each row ``i`` of ``x [N, L, D]`` at its own position ``starts[i]``."""
    n, width = tokens.shape[-2], x.shape[-1]
    idx, rel, inside = _span_index(x, starts, n, x.shape[1] + n)
    source = torch.where(idx < starts.unsqueeze(1), idx, idx - n).clamp(0, x.shape[1] - 1)
    gathered = x.gather(1, source.unsqueeze(-1).expand(-1, -1, width))
    return torch.where(inside.unsqueeze(-1), tokens.to(x.dtype)[rel], gathered)


def replace_tokens_at(x: Tensor, tokens: Tensor, starts: Tensor) -> Tensor:
    """Overwrite the span ``[starts[i], starts[i] + n)`` of each row with shared ``tokens [n, D]``."""
    _, rel, inside = _span_index(x, starts, tokens.shape[-2], x.shape[1])
    return torch.where(inside.unsqueeze(-1), tokens.to(x.dtype)[rel], x)


def insert_tokens(x: Tensor, tokens: Tensor, start: int) -> Tensor:
    """Insert ``tokens`` into ``x`` at position ``start``."""
    tokens = batched(tokens.to(x.dtype), x.shape[0])
    return torch.cat([x[:, :start], tokens, x[:, start:]], dim=1)
