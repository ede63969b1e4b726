"""Tower and plan invariants that a one-line change would break (issue 14, mutation testing): per-frame token
tiling, which models get the end-of-text truncation (paired runs included), the reduced-precision cast of the text
embeddings, linear text projections, final tokens only when asked for, and that ``run_paired`` applies every part
of both plans (masks, depth checks, deep suffix prompts) and handles towers of different depths."""

from __future__ import annotations

import open_clip
import pytest
import torch

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone import towers as towers_module
from vlprompt.backbone.plan import batched

from .test_towers import _close, _differs, images, tiny  # noqa: F401  (fixtures)

VISION_CFG = dict(width=64, patch_size=32, image_size=64, head_width=32)


def _clip(vision_layers: int, text_layers: int, custom: bool = False, **text_extra) -> torch.nn.Module:
    torch.manual_seed(0)
    vision_cfg = dict(layers=vision_layers, **VISION_CFG)
    text_cfg = dict(context_length=8, vocab_size=50, width=64, heads=2, layers=text_layers, **text_extra)
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(32, vision_cfg, text_cfg).eval()


def _neutral(layer, xv, xt):
    return xv, xt


# ---- plan.batched ------------------------------------------------------------------------------------------


def test_per_frame_tokens_are_tiled_even_when_their_count_equals_the_batch():
    """``[T, n, D]`` per-frame tokens for ``B*T`` frames (frame-major) are tiled B times, whatever ``n`` is."""
    tokens = torch.randn(2, 4, 3)  # T=2 frames, n=4 tokens == batch B*T=4
    out = batched(tokens, 4)
    assert out.shape == (4, 4, 3)
    assert torch.equal(out, tokens.repeat(2, 1, 1))
    assert torch.equal(batched(tokens[:1], 4), tokens[:1].expand(4, -1, -1))


# ---- text tower: truncation, cast, projection, returned tokens ---------------------------------------------


def test_eos_pooled_text_models_are_truncated_after_the_last_end_of_text():
    """Causal models pooling the first ``eos_id`` also cut the sequence after the last end-of-text before the blocks
    (much less work), with open_clip's result."""
    model = _clip(1, 2, pool_type="eos", eos_id=3)
    tower = towers_module.TextTower(model)
    assert tower.causal and tower.pool_type == "eos"
    tokens = torch.tensor([[1, 5, 3, 9, 0, 0, 0, 0], [1, 3, 4, 0, 0, 0, 0, 0]])  # end-of-text at 2 and 1
    seen = []
    hook = tower.blocks[0].ln_1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    try:
        with torch.no_grad():
            out = tower(tokens)
    finally:
        hook.remove()
    assert seen == [3]
    with torch.no_grad():
        _close(out.pooled, model.encode_text(tokens))


def test_reduced_precision_text_embeddings_take_the_transformers_dtype():
    """With open_clip's ``bf16`` precision the embeddings stay float32 and are cast to the blocks' dtype, as
    ``encode_text`` does; the tower's output is bf16 and matches open_clip's to bf16 tolerance."""
    torch.manual_seed(0)
    bb = vlprompt.load_backbone("vlprompt-tiny", pretrained=None, precision="bf16").eval()
    m = bb.model
    assert m.token_embedding.weight.dtype == torch.float32 and m.transformer.get_cast_dtype() == torch.bfloat16
    tokens = bb.tokenize(["a dog", "two cats on the grass"])
    with torch.no_grad():
        out, want = bb.text(tokens).pooled, m.encode_text(tokens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), atol=0.1, rtol=0.05)


def test_linear_text_projection_is_applied_as_a_module():
    """Text transformers with a biased projection (``proj_bias``) hold an ``nn.Linear``; the tower calls it."""
    model = _clip(1, 2, custom=True, proj_bias=True)
    assert isinstance(model.text.text_projection, torch.nn.Linear)
    tokens = torch.tensor([[1, 5, 7, 49, 0, 0, 0, 0], [1, 49, 4, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        _close(towers_module.TextTower(model)(tokens).pooled, model.encode_text(tokens))


def test_final_tokens_come_back_only_when_asked_for(tiny, images):  # noqa: F811
    tokens = tiny.tokenize(["a dog", "two cats"])
    with torch.no_grad():
        assert tiny.text(tokens).tokens is None
        assert tiny.text(tokens, return_tokens=True).tokens.shape == (2, tiny.context_length, tiny.text_width)
        assert tiny.vision(images).tokens is None
        vis, txt = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, None, None, _neutral)
    assert vis.tokens is not None  # the paired vision output carries its tokens for dense heads, text does not
    assert txt.tokens is None


# ---- run_paired -------------------------------------------------------------------------------------------


def test_paired_hook_sees_the_text_truncated_after_the_last_end_of_text(tiny, images):  # noqa: F811
    tokens = tiny.tokenize(["x x a red square", "x x dog"])
    keep = int(tokens.argmax(dim=-1).max()) + 1
    lengths = []

    def record(layer, xv, xt):
        lengths.append(xt.shape[1])
        return xv, xt

    with torch.no_grad():
        _, txt = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, None, None, record)
        _close(txt.pooled, tiny.text(tokens).pooled)
    assert lengths == [keep] * tiny.text.num_layers


def test_paired_towers_apply_the_plans_attention_masks(tiny, images):  # noqa: F811
    torch.manual_seed(21)
    tokens = tiny.tokenize(["x x a red square", "x x dog"])
    lv, lt = 65 + 2, tiny.context_length
    vmask = (torch.rand(lv, lv) > 0.5) | torch.eye(lv, dtype=torch.bool)
    tmask = (torch.rand(lt, lt) > 0.3) | torch.eye(lt, dtype=torch.bool)
    vplan = PromptPlan(insert=torch.randn(2, tiny.vision_width), attn_mask=vmask)
    tplan = PromptPlan(replace={0: torch.randn(2, tiny.text_width)}, attn_mask=tmask)
    with torch.no_grad():
        vis, txt = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, vplan, tplan, _neutral)
        want_v, want_t = tiny.vision(images, vplan).pooled, tiny.text(tokens, tplan).pooled
        _close(vis.pooled, want_v)
        _close(txt.pooled, want_t)
        _differs(want_v, tiny.vision(images, PromptPlan(insert=vplan.insert)).pooled)
        _differs(want_t, tiny.text(tokens, PromptPlan(replace=tplan.replace)).pooled)


def test_paired_towers_apply_deep_suffix_prompts(tiny, images):  # noqa: F811
    torch.manual_seed(22)
    tokens = tiny.tokenize(["x x a red square", "x x dog"])
    d = tiny.text_width
    tplan = PromptPlan(suffix={0: torch.randn(2, d), 2: torch.randn(2, d)})
    with torch.no_grad():
        _, txt = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, None, tplan, _neutral)
        want = tiny.text(tokens, tplan).pooled
        _close(txt.pooled, want)
        _differs(want, tiny.text(tokens, PromptPlan(suffix={0: tplan.suffix[0]})).pooled)


def test_paired_plans_beyond_a_towers_depth_raise(tiny, images):  # noqa: F811
    tokens = tiny.tokenize(["a", "b"])
    deep_v = PromptPlan(replace={tiny.vision.num_layers: torch.zeros(1, tiny.vision_width)})
    deep_t = PromptPlan(add={tiny.text.num_layers: torch.zeros(1, tiny.text_width)})
    with pytest.raises(ValueError, match="layer"):
        towers_module.run_paired(tiny.vision, tiny.text, images, tokens, deep_v, None, _neutral)
    with pytest.raises(ValueError, match="layer"):
        towers_module.run_paired(tiny.vision, tiny.text, images, tokens, None, deep_t, _neutral)


@pytest.mark.parametrize("vision_layers,text_layers", [(1, 2), (2, 1)])
def test_paired_towers_of_different_depths(vision_layers, text_layers):
    """Layers past the shorter tower's depth run the longer tower alone: the hook sees only the shared layers and
    both outputs equal the towers' own forwards."""
    model = _clip(vision_layers, text_layers)
    vision, text = towers_module.VisionTower(model.visual), towers_module.TextTower(model)
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 64, 64)
    tokens = torch.tensor([[1, 5, 7, 49, 0, 0, 0, 0], [1, 49, 4, 0, 0, 0, 0, 0]])
    layers = []

    def record(layer, xv, xt):
        layers.append(layer)
        return xv, xt

    with torch.no_grad():
        vis, txt = towers_module.run_paired(vision, text, pixels, tokens, None, None, record)
        _close(vis.pooled, vision(pixels).pooled)
        _close(txt.pooled, text(tokens).pooled)
    assert layers == list(range(min(vision_layers, text_layers)))


# ---- open_clip's custom blocks, projection-less vision, gradient checkpointing -----------------------------


def _custom_block_clip() -> torch.nn.Module:
    """A micro CLIP whose towers are built from open_clip's ``CustomResidualAttentionBlock`` (qk-norm)."""
    torch.manual_seed(0)
    vision_cfg = dict(layers=2, qk_norm=True, **VISION_CFG)
    text_cfg = dict(context_length=8, vocab_size=50, width=64, heads=2, layers=2, qk_norm=True)
    model = open_clip.CLIP(32, vision_cfg, text_cfg).eval()
    assert isinstance(model.transformer.resblocks[0], open_clip.transformer.CustomResidualAttentionBlock)
    return model


def test_custom_blocks_run_as_open_clip_runs_them_with_the_causal_and_the_plans_masks():
    """Blocks other than the standard one are called as open_clip calls them (the tower adds the causal mask, and
    the plan's mask on top); prefix prompts need the standard block's attention and are refused."""
    model = _custom_block_clip()
    vision, text = towers_module.VisionTower(model.visual), towers_module.TextTower(model)
    tokens = torch.tensor([[1, 5, 7, 49, 0, 0, 0, 0], [1, 3, 49, 0, 0, 0, 0, 0]])
    pixels = torch.randn(2, 3, 64, 64)
    allowed = torch.ones(8, 8, dtype=torch.bool)
    allowed[2:, 1] = False  # later tokens may not look at the first word
    with torch.no_grad():
        _close(vision(pixels).pooled, model.encode_image(pixels))
        _close(text(tokens).pooled, model.encode_text(tokens))
        masked = text(tokens, PromptPlan(attn_mask=allowed)).pooled
        x = model.token_embedding(tokens) + model.positional_embedding
        mask = towers_module.causal_mask(8, x.device, x.dtype).masked_fill(~allowed, float("-inf"))
        for block in model.transformer.resblocks:
            x = block(x, attn_mask=mask)
        want = model.ln_final(x)[torch.arange(2), tokens.argmax(-1)] @ model.text_projection
        _close(masked, want)
        _differs(masked, text(tokens).pooled)
        _close(text(tokens, PromptPlan(attn_mask=torch.ones(8, 8, dtype=torch.bool))).pooled, text(tokens).pooled)
        prefix = (torch.randn(2, 64), torch.randn(2, 64))
        with pytest.raises(NotImplementedError, match="CustomResidualAttentionBlock"):
            text(tokens, PromptPlan(prefix={1: prefix}))


def test_a_vision_tower_without_projection_pools_without_it():
    """open_clip sets ``visual.proj = None`` when the head is pruned: the tower then returns the pooled width."""
    model = _clip(2, 1)
    model.visual.proj = None
    tower = towers_module.VisionTower(model.visual)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(pixels, return_tokens=True)
        _close(out.pooled, model.visual(pixels))
        assert out.pooled.shape == (2, 64)
        _close(tower.project_tokens(out.tokens), model.visual.ln_post(out.tokens))


def test_checkpointed_prefix_prompts_on_a_frozen_backbone_keep_their_masks_and_gradients():
    """The usual prompt-tuning case: nothing but the prompts requires grad, so the first checkpointed block's tensor
    inputs do not either; the prompts (passed inside the prefix tuple) and the plan's mask must still be used in the
    forward and reached in the backward exactly as without checkpointing."""
    model = _clip(2, 1)
    model.requires_grad_(False)
    tower = towers_module.VisionTower(model.visual)
    pixels = torch.randn(2, 3, 64, 64)
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[:, 2] = False
    allowed[2, 2] = True
    torch.manual_seed(1)
    key, value = torch.randn(2, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    results = []
    for enable in (False, True):
        tower.set_grad_checkpointing(enable)
        key.grad = value.grad = None
        pooled = tower(pixels, PromptPlan(prefix={0: (key, value)}, attn_mask=allowed)).pooled
        pooled.square().sum().backward()
        results.append((pooled.detach(), key.grad.clone(), value.grad.clone()))
    for plain, checkpointed in zip(*results, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _differs(results[0][0], tower(pixels, PromptPlan(prefix={0: (key, value)})).pooled)


def test_reduced_precision_vision_casts_images_embeddings_and_prompts_to_the_blocks_dtype():
    """With ``bf16`` precision the patch convolution and blocks are bf16 while the class and positional embeddings
    stay float32: float32 images, embeddings and prefix prompts are all cast to the convolution's dtype."""
    torch.manual_seed(0)
    bb = vlprompt.load_backbone("vlprompt-tiny", pretrained=None, precision="bf16").eval()
    v = bb.model.visual
    assert v.conv1.weight.dtype == torch.bfloat16 and v.class_embedding.dtype == torch.float32
    pixels = torch.randn(2, 3, bb.image_size, bb.image_size)
    prefix = {1: (torch.randn(2, bb.vision_width), torch.randn(2, bb.vision_width))}
    with torch.no_grad():
        out, want = bb.vision(pixels).pooled, v(pixels.bfloat16())
        prompted = bb.vision(pixels, PromptPlan(prefix=prefix)).pooled
    assert out.dtype == prompted.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), atol=0.1, rtol=0.05)
    _differs(prompted.float(), out.float())


def test_attention_dropout_is_applied_in_training_only():
    """A block's attention dropout (0 in open_clip's models, settable) acts in train mode and never in eval."""
    model = _clip(1, 1)
    block = model.visual.transformer.resblocks[0]
    block.attn.dropout = 0.5
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        block.eval()
        evaluated = towers_module.run_block(block, x)
        block.attn.dropout = 0.0
        _close(evaluated, towers_module.run_block(block, x))
        block.attn.dropout = 0.5
        block.train()
        torch.manual_seed(0)
        _differs(towers_module.run_block(block, x), evaluated)


def test_plans_without_a_start_use_the_towers_first_position_and_explicit_starts_stay():
    """``start=None`` means the tower's first content position (after CLS; the first word, 0 for tokenizers without
    a start token); an explicit start is absolute. Paired runs and the detector's token drop resolve it alike."""
    from vlprompt.backbone.detector import drop_inserted

    bb = vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()
    torch.manual_seed(3)
    tokens = bb.tokenize(["x x a dog", "x x two red stars"])
    ctx, vis = torch.randn(2, bb.text_width), torch.randn(2, bb.vision_width)
    pixels = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        assert bb.vision.first_position == bb.text.first_position == 1
        text = {s: bb.text(tokens, PromptPlan(replace={0: ctx}, start=s)).pooled for s in (None, 0, 1)}
        _close(text[None], text[1])
        _differs(text[0], text[1])
        explicit = PromptPlan(insert=vis, add={1: vis}, start=1)
        _close(bb.vision(pixels, PromptPlan(insert=vis, add={1: vis})).pooled, bb.vision(pixels, explicit).pooled)
        x = torch.arange(5.0).view(1, 5, 1)
        assert drop_inserted(x, PromptPlan(insert=torch.zeros(2, 1)))[0, :, 0].tolist() == [0.0, 3.0, 4.0]
        bb.text.first_position = 0
        _close(bb.text(tokens, PromptPlan(replace={0: ctx})).pooled, text[0])
        _close(bb.text(tokens, PromptPlan(replace={0: ctx}, start=1)).pooled, text[1])
        tplan = PromptPlan(replace={0: ctx}, add={1: ctx})
        _, paired = towers_module.run_paired(bb.vision, bb.text, pixels, tokens, None, tplan, _neutral)
        _close(paired.pooled, bb.text(tokens, tplan).pooled)
        _differs(paired.pooled, bb.text(tokens, PromptPlan(replace={0: ctx}, add={1: ctx}, start=1)).pooled)
