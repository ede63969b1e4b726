"""Promptable towers: explicit per-block loops over open_clip's vision and text transformers.

With an empty :class:`PromptPlan` they reproduce open_clip's ``encode_image`` / ``encode_text`` to
float tolerance (tested). Attention runs through ``scaled_dot_product_attention`` so that prefix
tokens and extra masks cost nothing when unused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlprompt.backbone.plan import (
    PromptPlan,
    batched,
    insert_tokens,
    insert_tokens_at,
    replace_tokens_at,
    write_tokens,
)


@dataclass
class TowerOutput:
    """Pooled, projected embedding ``[B, E]`` and, when asked for, all final tokens ``[B, L, D]``.

    Under global-local video attention ``pooled`` is global token 0 and ``frames`` holds each frame's pooled
    embedding ``[B, T, E]``.
    """

    pooled: Tensor
    tokens: Tensor | None = None
    frames: Tensor | None = None


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool masks (True = may attend) become additive 0 / -inf masks."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def combine_masks(*masks: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Sum of the given additive (or bool) masks; None when there are none."""
    present = [_to_additive(m, dtype) for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out + m
    return out


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive causal mask ``[L, L]``: -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def run_block(
    block: nn.Module,
    x: Tensor,
    attn_mask: Tensor | None = None,
    prefix: tuple[Tensor, Tensor] | None = None,
    is_causal: bool = False,
) -> Tensor:
    """One residual attention block on ``x`` ``[B, L, D]`` with optional key/value prefix tokens."""
    if not isinstance(block, ResidualAttentionBlock):  # e.g. open_clip's custom blocks (qk-norm, scaled cosine)
        if prefix is not None:
            raise NotImplementedError(f"prefix prompts need standard attention blocks, not {type(block).__name__}")
        if is_causal:
            attn_mask = combine_masks(causal_mask(x.shape[1], x.device, x.dtype), attn_mask, dtype=x.dtype)
        return block(x, attn_mask=attn_mask)

    attn: nn.MultiheadAttention = block.attn
    length = x.shape[1]
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if prefix is not None:
        pk, pv = (batched(p.to(x.dtype), x.shape[0]) for p in prefix)
        k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
        if is_causal:  # prefix keys stay visible to every query
            attn_mask = combine_masks(causal_mask(length, x.device, x.dtype), attn_mask, dtype=x.dtype)
            is_causal = False
        if attn_mask is not None:
            attn_mask = F.pad(_to_additive(attn_mask, x.dtype), (pk.shape[1], 0), value=0.0)
    elif is_causal and attn_mask is not None:
        attn_mask = combine_masks(causal_mask(length, x.device, x.dtype), attn_mask, dtype=x.dtype)
        is_causal = False
    return _residual(block, x, _attend(block, q, k, v, attn_mask, is_causal))


def _attend(block: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """Multi-head SDPA of projected ``q [B, L, D]`` over ``k, v [B, S, D]``, then the output projection."""
    attn: nn.MultiheadAttention = block.attn
    batch, length, width = q.shape
    heads = attn.num_heads

    def heads_first(t: Tensor) -> Tensor:
        return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    if mask is not None:
        mask = _to_additive(mask, q.dtype)
        if mask.dim() == 3:  # [B, L, S] -> broadcast over heads
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(
        heads_first(q),
        heads_first(k),
        heads_first(v),
        attn_mask=mask,
        dropout_p=attn.dropout if block.training else 0.0,
        is_causal=is_causal,
    )
    return F.linear(out.transpose(1, 2).reshape(batch, length, width), attn.out_proj.weight, attn.out_proj.bias)


def _residual(block: nn.Module, x: Tensor, attended: Tensor) -> Tensor:
    """The rest of a pre-LN block: residual attention output, then the residual MLP."""
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def run_global_local_block(block: nn.Module, g: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """DGL's global-local video attention in one block, factorised (no dense ``[G+T·L]²`` mask).

    ``g [B, G, D]`` are a video's global tokens, ``f [B·T, L, D]`` its frames' tokens. Frame tokens attend to
    ``[globals of their video ; their own frame]``; global tokens attend to ``[globals ; every frame token of
    the video]``. Equal to one dense attention with the corresponding mask (tested).
    """
    if not isinstance(block, ResidualAttentionBlock):
        raise NotImplementedError(f"global-local attention needs standard blocks, not {type(block).__name__}")
    attn: nn.MultiheadAttention = block.attn
    batch, frames = g.shape[0], f.shape[0] // g.shape[0]
    qg, kg, vg = F.linear(block.ln_1(g), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qf, kf, vf = F.linear(block.ln_1(f), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    local_k = torch.cat([kg.repeat_interleave(frames, 0), kf], dim=1)
    local_v = torch.cat([vg.repeat_interleave(frames, 0), vf], dim=1)
    global_k = torch.cat([kg, kf.reshape(batch, -1, kf.shape[-1])], dim=1)
    global_v = torch.cat([vg, vf.reshape(batch, -1, vf.shape[-1])], dim=1)
    f = _residual(block, f, _attend(block, qf, local_k, local_v, None, False))
    g = _residual(block, g, _attend(block, qg, global_k, global_v, None, False))
    return g, f


class _Tower(nn.Module):
    """Shared per-block loop; subclasses prepare the sequence and pool it."""

    blocks: nn.ModuleList
    # Where a plan without its own ``start`` puts prompt tokens: right after CLS / start-of-text. The Backbone sets
    # the text tower's from its tokenizer (0 for tokenizers without a start token).
    first_position: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.grad_checkpointing = enable

    def _run_blocks(
        self,
        x: Tensor,
        plan: PromptPlan,
        is_causal: bool,
        before_block: Callable[[int, Tensor], Tensor] | None = None,
    ) -> Tensor:
        mask = self._check(plan, x.dtype)
        for layer in range(self.num_layers):
            x = self._enter(layer, x, plan, before_block)
            x = self._block(layer, x, plan, mask, is_causal)
        return x

    def _check(self, plan: PromptPlan, dtype: torch.dtype) -> Tensor | None:
        """The attention mask of every block, once ``plan`` is known to fit this tower."""
        if plan.max_layer() >= self.num_layers:
            raise ValueError(f"prompt plan touches layer {plan.max_layer()}, tower has {self.num_layers} blocks")
        return combine_masks(plan.attn_mask, dtype=dtype)

    def _enter(
        self, layer: int, x: Tensor, plan: PromptPlan, before_block: Callable[[int, Tensor], Tensor] | None = None
    ) -> Tensor:
        """What happens before block ``layer``: the plan's replaced / added prompts, then the caller's hook."""
        if layer > 0 or not getattr(self, "layer0_is_embedding", False):  # layer 0's were written with the embedding
            if layer in plan.replace:
                x = write_tokens(x, plan.replace[layer], plan.start, "replace")
            if layer in plan.add:
                x = write_tokens(x, plan.add[layer], plan.start, "add")
        if before_block is not None:
            x = before_block(layer, x)
        return x

    def _block(self, layer: int, x: Tensor, plan: PromptPlan, mask: Tensor | None, is_causal: bool) -> Tensor:
        """Block ``layer`` itself (recomputed in backward under gradient checkpointing)."""
        block, prefix = self.blocks[layer], plan.prefix.get(layer)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(run_block, block, x, mask, prefix, is_causal, use_reentrant=False)
        return run_block(block, x, mask, prefix, is_causal)


class VisionTower(_Tower):
    """open_clip ``VisionTransformer`` as an explicit loop that accepts a prompt plan.

    Inputs are images ``[B, 3, H, W]`` or frames ``[B, T, 3, H, W]`` (batched as ``B*T``; the pooled
    output is then ``[B, T, E]``).
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise TypeError(f"prompt plans need an open_clip VisionTransformer, got {type(visual).__name__}")
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.width: int = visual.transformer.width

    def embed(self, images: Tensor, plan: PromptPlan | None = None) -> Tensor:
        """Patch + class + positional embeddings, with layer-0 inserted prompts; ``[B, L, D]``."""
        plan = plan.at(self.first_position) if plan is not None else None
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        if plan is not None and plan.insert is not None and plan.insert_before_ln_pre:
            x = insert_tokens(x, plan.insert, plan.start)
        x = v.ln_pre(x)
        if plan is not None and plan.insert is not None and not plan.insert_before_ln_pre:
            x = insert_tokens(x, plan.insert, plan.start)
        return x

    def forward(self, images: Tensor, plan: PromptPlan | None = None, return_tokens: bool = False) -> TowerOutput:
        """Encode images (or frames) under ``plan``."""
        frames = images.shape[1] if images.dim() == 5 else 0
        if frames:
            images = images.flatten(0, 1)
        plan = (plan or PromptPlan()).at(self.first_position)
        x = self.embed(images, plan)
        if plan.global_tokens is not None:
            return self._global_local(x, plan, frames, return_tokens)
        x = self._run_blocks(x, plan, is_causal=False)
        pooled = self.project(x)
        if frames:
            pooled = pooled.unflatten(0, (-1, frames))
        return TowerOutput(pooled, x if return_tokens else None)

    def pool(self, x: Tensor) -> Tensor:
        """open_clip's pooling of final tokens ``[N, L, D]`` -> ``[N, D]`` (``ln_post`` of CLS by default)."""
        pooled, _ = self.visual._pool(x)
        return pooled

    def project(self, x: Tensor) -> Tensor:
        """open_clip's pooling and projection of final tokens ``[N, L, D]`` -> ``[N, E]``."""
        pooled = self.pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def project_tokens(self, x: Tensor) -> Tensor:
        """``ln_post`` and projection applied to every token ``[N, L, D]`` -> ``[N, L, E]``."""
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def _global_local(self, f: Tensor, plan: PromptPlan, frames: int, return_tokens: bool) -> TowerOutput:
        """DGL's loop: frames ``[B*T, L, D]`` plus video-level global tokens, one global-local block at a time."""
        if not frames:
            raise ValueError("global tokens need frame input [B, T, 3, H, W]")
        if plan.prefix or plan.attn_mask is not None:
            raise ValueError("global tokens cannot be combined with prefix prompts or extra attention masks")
        if plan.max_layer() >= self.num_layers:
            raise ValueError(f"prompt plan touches layer {plan.max_layer()}, tower has {self.num_layers} blocks")
        g = batched(plan.global_tokens.to(f.dtype), f.shape[0] // frames)
        for layer, block in enumerate(self.blocks):
            if layer in plan.replace:
                f = write_tokens(f, plan.replace[layer], plan.start, "replace")
            if layer in plan.add:
                f = write_tokens(f, plan.add[layer], plan.start, "add")
            if self.grad_checkpointing and torch.is_grad_enabled():
                g, f = checkpoint(run_global_local_block, block, g, f, use_reentrant=False)
            else:
                g, f = run_global_local_block(block, g, f)
        frame_pooled = self.project(f).unflatten(0, (-1, frames))
        return TowerOutput(self.project(g), g if return_tokens else None, frame_pooled)


class TextTower(_Tower):
    """open_clip's text transformer (CLIP or a custom-text ``TextTransformer``) as an explicit loop.

    Since attention is causal and pooling reads the end-of-text token, everything after the last
    end-of-text position in the batch is dropped before the blocks: identical results, much less work
    (77-token contexts usually hold a dozen real tokens).
    """

    layer0_is_embedding = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        src = getattr(model, "text", None) or model
        if getattr(src, "cls_emb", None) is not None or not hasattr(src, "token_embedding"):
            raise TypeError(f"prompt plans need an open_clip CLIP text transformer, got {type(src).__name__}")
        if getattr(src, "use_pad_mask", False):
            raise TypeError("text towers with padding masks are not supported yet")
        self.src = src
        self.blocks = src.transformer.resblocks
        self.width: int = src.transformer.width
        self.pool_type: str = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        self.eos_id: int | None = getattr(src, "text_eos_id", None) or getattr(src, "eos_id", None)
        self.causal = getattr(src, "attn_mask", None) is not None
        self.context_length: int = src.positional_embedding.shape[0]

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """Word embeddings of token ids, ``[B, L, D]`` (no positional embedding)."""
        return self.src.token_embedding(tokens)

    def pool_positions(self, tokens: Tensor) -> Tensor:
        """Index of the pooled (end-of-text) token per row."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)

    def forward(self, tokens: Tensor, plan: PromptPlan | None = None, return_tokens: bool = False) -> TowerOutput:
        """Encode token ids ``[B, L]`` under ``plan``."""
        plan = (plan or PromptPlan()).at(self.first_position)
        x, positions, before_block = self._begin(tokens, plan, return_tokens)
        x = self._run_blocks(x, plan, is_causal=self.causal, before_block=before_block)
        return self._end(x, positions, return_tokens)

    def _begin(
        self, tokens: Tensor, plan: PromptPlan, return_tokens: bool = False
    ) -> tuple[Tensor, Tensor, Callable[[int, Tensor], Tensor] | None]:
        """The sequence entering block 0, the pooled position per row, and the suffix prompts' hook (or None)."""
        src = self.src
        positions = self.pool_positions(tokens)
        if self.causal and self.pool_type in ("argmax", "eos") and plan.attn_mask is None and not return_tokens:
            keep = max(int(positions.max()) + 1, plan.start + max(_span(plan), 0))
            tokens = tokens[:, :keep]
        cast = src.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast)
        if 0 in plan.replace:
            x = write_tokens(x, plan.replace[0], plan.start, "replace")
        if 0 in plan.add:
            x = write_tokens(x, plan.add[0], plan.start, "add")
        x = x + src.positional_embedding[: x.shape[1]].to(cast)
        if plan.insert is not None:
            x = insert_tokens(x, plan.insert, plan.start)
            positions = positions + (positions >= plan.start).long() * plan.num_inserted
        before_block = None
        if plan.suffix:
            if 0 not in plan.suffix:
                raise ValueError("suffix prompts are inserted at layer 0 and can only be replaced later")
            starts = positions  # the suffix sits where end-of-text was; end-of-text moves behind it
            x = insert_tokens_at(x, plan.suffix[0], starts)
            positions = positions + plan.suffix[0].shape[-2]

            def before_block(layer: int, h: Tensor) -> Tensor:
                return replace_tokens_at(h, plan.suffix[layer], starts) if layer > 0 and layer in plan.suffix else h

        return x, positions, before_block

    def _end(self, x: Tensor, positions: Tensor, return_tokens: bool = False) -> TowerOutput:
        """``ln_final``, the pooled token of each row, the projection."""
        src = self.src
        x = src.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), positions]
        proj = src.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return TowerOutput(pooled, x if return_tokens else None)


def _span(plan: PromptPlan) -> int:
    """Length of the longest replaced/added span (so truncation never cuts a prompt)."""
    spans = [t.shape[-2] for t in (*plan.replace.values(), *plan.add.values())]
    return max(spans, default=0)


def run_paired(
    vision: VisionTower,
    text: TextTower,
    images: Tensor,
    tokens: Tensor,
    vision_plan: PromptPlan | None,
    text_plan: PromptPlan | None,
    between: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[TowerOutput, TowerOutput]:
    """Both towers on paired inputs (row ``i`` of ``images`` with row ``i`` of ``tokens``), block by block in step.

    Before block ``l`` of each tower (after the plans' prompt writes) ``between(l, x_vision, x_text)`` sees and
    may rewrite both hidden states; layers past the shorter tower's depth run alone. This is where a model couples
    the modalities inside the encoders, as LPI's grounding model mixes its vision and text prompt tokens at every
    layer (``InteractModule``). With a ``between`` that returns its inputs the outputs equal the two towers' own
    forwards. The vision output carries its final tokens (``TowerOutput.tokens``) for dense heads.
    """
    if images.dim() != 4 or images.shape[0] != tokens.shape[0]:
        raise ValueError(f"paired towers need images [B, 3, H, W] and tokens [B, L] of one batch, got "
                         f"{tuple(images.shape)} and {tuple(tokens.shape)}")  # fmt: skip
    vplan = (vision_plan or PromptPlan()).at(vision.first_position)
    tplan = (text_plan or PromptPlan()).at(text.first_position)
    if vplan.global_tokens is not None:
        raise ValueError("paired towers do not take global video tokens")
    xv = vision.embed(images, vplan)
    xt, positions, before_text = text._begin(tokens, tplan)
    vmask = vision._check(vplan, xv.dtype)
    tmask = text._check(tplan, xt.dtype)
    shared = min(vision.num_layers, text.num_layers)
    for layer in range(max(vision.num_layers, text.num_layers)):
        if layer < vision.num_layers:
            xv = vision._enter(layer, xv, vplan)
        if layer < text.num_layers:
            xt = text._enter(layer, xt, tplan, before_text)
        if layer < shared:
            xv, xt = between(layer, xv, xt)
        if layer < vision.num_layers:
            xv = vision._block(layer, xv, vplan, vmask, False)
        if layer < text.num_layers:
            xt = text._block(layer, xt, tplan, tmask, text.causal)
    return TowerOutput(vision.project(xv), xv), text._end(xt, positions)
