"""DGL's prompt generators (Yang et al., AAAI 2024): one shared latent space for text and frame prompts.

The prompts do not depend on the input sample; they are generated once per step and broadcast (the
reference recomputes them for every batch element). Shapes, with K prompt layers, P local prompts per
frame, G global prompts, Lt = 2P text prompts (P prefix + P postfix) and T frames:

- text prompts ``[K, Lt, Dt]``: rows ``0..P-1`` are the prefix, ``P..2P-1`` the postfix;
- frame prompts ``[K, P, Dv]`` shared by every frame (Linear) or ``[K, T, P, Dv]`` per frame (Transformer);
- global prompts ``[G, Dv]``, inserted once before the first block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import Tensor, nn

from vlprompt.prompts.deep import vpt_init_range


@dataclass
class DGLPrompts:
    """What one generator call produces."""

    text: Tensor
    frames: Tensor
    globals: Tensor

    def prefix(self) -> Tensor:
        """Prefix text prompts ``[K, P, Dt]``."""
        return self.text[:, : self.text.shape[1] // 2]

    def postfix(self) -> Tensor:
        """Postfix text prompts ``[K, P, Dt]`` (inert after end-of-text under the causal mask)."""
        return self.text[:, self.text.shape[1] // 2 :]


def _uniform(shape: tuple[int, ...], bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class DGLLinearPrompts(nn.Module):
    """ "Unified linear projection": frame prompts ``V [K, P, Dv]``; text prompts are two linear maps of ``V``."""

    def __init__(self, depth: int, n_local: int, n_global: int, vision_width: int, text_width: int, patch: int):
        super().__init__()
        bound = vpt_init_range(patch, vision_width)
        self.depth, self.n_local, self.vision_width = depth, n_local, vision_width
        # stored as the reference's [1, P, K*Dv] table so checkpoints map one to one
        self.visual = _uniform((1, n_local, depth * vision_width), bound)
        self.prefix_proj = nn.Linear(vision_width, text_width)
        self.postfix_proj = nn.Linear(vision_width, text_width)
        self.global_prompts = _uniform((1, n_global, vision_width), bound)

    def forward(self) -> DGLPrompts:
        v = self.visual.view(self.n_local, self.depth, self.vision_width).transpose(0, 1)  # [K, P, Dv]
        text = torch.cat([self.prefix_proj(v), self.postfix_proj(v)], dim=1)
        return DGLPrompts(text=text, frames=v, globals=self.global_prompts[0])


class DGLTransformerPrompts(nn.Module):
    """ "Unified prompt transformer": one embedding table of text and per-frame prompts, mixed per layer by a block.

    ``E [Lt + P·T, K·Dv]`` is viewed as ``K`` sequences of ``Lt + P·T`` tokens (no attention across layers); a
    pre-LN CLIP block lets text and frame prompts of the same layer attend to each other; an MLP maps the text
    rows to the text width. Frame rows are frame-major: frame ``t`` uses rows ``Lt + t·P .. Lt + t·P + P - 1``.
    """

    def __init__(
        self, depth: int, n_local: int, n_global: int, n_text: int, frames: int, vision_width: int, text_width: int,
        patch: int, heads: int,
    ):  # fmt: skip
        super().__init__()
        self.depth, self.n_local, self.n_text = depth, n_local, n_text
        self.frames, self.vision_width = frames, vision_width
        self.embedding = nn.Embedding(n_text + n_local * frames, depth * vision_width)  # N(0, 1) as the reference
        self.block = ResidualAttentionBlock(vision_width, heads, act_layer=QuickGELU)
        self.mlp = nn.Sequential(
            nn.Linear(vision_width, 2 * vision_width), QuickGELU(), nn.Linear(2 * vision_width, text_width)
        )
        self.global_prompts = _uniform((1, n_global, vision_width), vpt_init_range(patch, vision_width))

    def forward(self) -> DGLPrompts:
        rows = self.embedding.weight.shape[0]
        e = self.embedding.weight.view(rows, self.depth, self.vision_width).transpose(0, 1)  # [K, rows, Dv]
        z = self.block(e)
        text = self.mlp(z[:, : self.n_text])
        frames = z[:, self.n_text :].reshape(self.depth, self.frames, self.n_local, self.vision_width)
        return DGLPrompts(text=text, frames=frames, globals=self.global_prompts[0])
