"""LPI's low-rank prompts (Kelvin-ywc/LPI, ACM MM 2024) and the full-rank per-task prompts of S-Prompts.

Both produce ``(vision, text)`` prompt tensors ``[L, N, Dv]`` and ``[L, N, Dt]`` (one slice per prompt layer), so
a method can enter them the same way: slice 0 inserted / replacing the text context, deeper slices added.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def cp_tensor(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Rank-r CP tensor ``(1/r) sum_k a[:, k] ⊗ b[:, k] ⊗ c[:, k]`` of shape ``[len(a), len(b), len(c)]``."""
    return torch.einsum("lk,nk,dk->lnd", a, b, c) / a.shape[1]


class DecomposedPrompt(nn.Module):
    """One task's LPI prompt: CP rank-``r`` tensors for both modalities sharing the layer factor.

    ``P_v = (1/r) Σ_k A[:,k] ⊗ B_v[:,k] ⊗ C_v[:,k]`` and ``P_t`` likewise with ``B_t, C_t``: ``A [L, r]`` is the
    common (cross-modal) factor, ``B_* [N, r]`` token factors and ``C_* [D_*, r]`` channel factors per modality.
    All factors start N(0, std²) (std 0.5 in LPI), so prompt entries start with std ≈ std³·/√r ≈ 0.06.
    Parameters: ``r (L + 2N + Dv + Dt)``, 5,284 for L=9, N=16, ViT-B/16 (768 + 512), r=4.
    """

    def __init__(
        self, layers: int, n_tokens: int, vision_width: int, text_width: int, rank: int, std: float = 0.5
    ) -> None:
        super().__init__()
        if min(layers, n_tokens, vision_width, text_width, rank) < 1:
            raise ValueError("DecomposedPrompt sizes and rank must be >= 1")

        def factor(rows: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(rows, rank) * std)

        self.layer = factor(layers)  # A, shared by both modalities
        self.token_v, self.token_t = factor(n_tokens), factor(n_tokens)
        self.channel_v, self.channel_t = factor(vision_width), factor(text_width)

    @property
    def rank(self) -> int:
        return self.layer.shape[1]

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(P_v [L, N, Dv], P_t [L, N, Dt])``."""
        return cp_tensor(self.layer, self.token_v, self.channel_v), cp_tensor(self.layer, self.token_t, self.channel_t)


class FullRankPrompt(nn.Module):
    """S-Prompts-style per-task prompts: free ``[L, N, Dv]`` and ``[L, N, Dt]`` tensors, N(0, std²) (std 0.02)."""

    def __init__(self, layers: int, n_tokens: int, vision_width: int, text_width: int, std: float = 0.02) -> None:
        super().__init__()
        self.vision = nn.Parameter(torch.randn(layers, n_tokens, vision_width) * std)
        self.text = nn.Parameter(torch.randn(layers, n_tokens, text_width) * std)

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.vision, self.text


class CPMatrices(nn.Module):
    """A stack of ``L`` matrices ``[I, J]`` stored as one rank-``r`` CP tensor (LPI's interaction weights)."""

    def __init__(self, layers: int, rows: int, cols: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(layers, rank))
        self.b = nn.Parameter(torch.empty(rows, rank))
        self.c = nn.Parameter(torch.empty(cols, rank))
        for p in (self.a, self.b, self.c):  # LPI's InteractModule init
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def layer(self, index: int) -> Tensor:
        """Matrix ``index``: ``(1/r) Σ_k a[index, k] b[:, k] c[:, k]ᵀ``, shape ``[I, J]``."""
        return (self.b * self.a[index]) @ self.c.T / self.a.shape[1]


class LowRankInteraction(nn.Module):
    """LPI's per-task cross-modal interaction ("paper mode"), applied to the prompt tensors of layers ``1..D-1``.

    At layer ``l``: ``t' = v W_v2t[l] + b``, ``v' = t W_t2v[l] + b`` (weights and bias from one CP tensor each),
    then ``v ← LN_v((1-m) v + m v')``, ``t ← LN_t((1-m) t + m t')`` with ``m = 0.1``. LPI's grounding code mixes
    the prompt-region *hidden states* of a paired image and caption; in a dual-encoder retrieval model image and
    caption are encoded apart, so here the prompts themselves interact and the encoders stay independent.
    Parameters: ``r·(L + Dv + 1 + Dt)·2 + 2(Dv + Dt)``.
    """

    def __init__(self, layers: int, vision_width: int, text_width: int, rank: int, mix: float = 0.1) -> None:
        super().__init__()
        self.v2t = CPMatrices(layers, vision_width + 1, text_width, rank)
        self.t2v = CPMatrices(layers, text_width + 1, vision_width, rank)
        self.ln_v, self.ln_t = nn.LayerNorm(vision_width), nn.LayerNorm(text_width)
        self.mix = mix

    def forward(self, layer: int, v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mixed ``(v [N, Dv], t [N, Dt])`` of one layer."""
        w_vt, w_tv = self.v2t.layer(layer), self.t2v.layer(layer)
        t_new = v @ w_vt[:-1] + w_vt[-1]
        v_new = t @ w_tv[:-1] + w_tv[-1]
        m = self.mix
        return self.ln_v((1 - m) * v + m * v_new), self.ln_t((1 - m) * t + m * t_new)
