"""Promptable towers: empty plans reproduce open_clip; every plan operation matches a hand-written reference.

References are written with open_clip's own modules (``blk(x, attn_mask=...)``, ``ln_pre``, ``ln_post``,
``token_embedding`` ...) and manual token surgery, never with the towers' helpers.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone import towers as towers_module

ATOL = 1e-5
TEXTS = ["a", "a photo of a dog sitting on the grass next to a red ball", "two cats"]


def _load(name: str) -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone(name, pretrained=None).eval()


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    """The embedded tiny CLIP, random init, frozen (vision: 65 tokens x 192, 4 blocks; text: 128 wide)."""
    return _load("vlprompt-tiny").freeze()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs diff {diff}"


def _differs(a: torch.Tensor, b: torch.Tensor) -> None:
    """The prompt must have a visible effect, otherwise a comparison proves nothing."""
    assert (a - b).abs().max().item() > 1e-3


# ---- references -------------------------------------------------------------------------------


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """bool (True = may attend) -> additive float mask for nn.MultiheadAttention."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


def _insert(x: torch.Tensor, tokens: torch.Tensor, start: int = 1) -> torch.Tensor:
    tokens = tokens if tokens.dim() == 3 else tokens.expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], tokens, x[:, start:]], dim=1)


def _set(x: torch.Tensor, tokens: torch.Tensor, start: int = 1, add: bool = False) -> torch.Tensor:
    x = x.clone()
    n = tokens.shape[-2]
    if add:
        x[:, start : start + n] = x[:, start : start + n] + tokens
    else:
        x[:, start : start + n] = tokens
    return x


def manual_block(blk, x, prefix=None, mask=None):
    """One open_clip ResidualAttentionBlock computed by hand, keys/values optionally prefixed."""
    attn = blk.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    hd = width // heads
    h = blk.ln_1(x)
    q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    n = 0
    if prefix is not None:
        pk, pv = (p if p.dim() == 3 else p.expand(batch, -1, -1) for p in prefix)
        n = pk.shape[1]
        k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)

    def split(t):
        return t.reshape(batch, t.shape[1], heads, hd).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores + F.pad(mask, (n, 0), value=0.0)
    out = (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)
    x = x + attn.out_proj(out)
    return x + blk.mlp(blk.ln_2(x))


def ref_vision(bb, images, *, insert=None, before_ln_pre=False, replace=None, add=None, prefix=None, mask=None):
    v = bb.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    if insert is not None and before_ln_pre:
        x = _insert(x, insert)
    x = v.ln_pre(x)
    if insert is not None and not before_ln_pre:
        x = _insert(x, insert)
    for layer, blk in enumerate(v.transformer.resblocks):
        if replace and layer in replace:
            x = _set(x, replace[layer])
        if add and layer in add:
            x = _set(x, add[layer], add=True)
        if prefix and layer in prefix:
            x = manual_block(blk, x, prefix[layer], mask)
        else:
            x = blk(x, attn_mask=mask)
    return v.ln_post(x[:, 0]) @ v.proj


def ref_text(bb, tokens, *, replace=None, add=None, insert=None, prefix=None, extra_mask=None):
    """Full-length (untruncated) text encoding; layer 0 replace/add act on word embeddings."""
    m = bb.model
    replace, add = replace or {}, add or {}
    e = m.token_embedding(tokens)
    if 0 in replace:
        e = _set(e, replace[0])
    if 0 in add:
        e = _set(e, add[0], add=True)
    x = e + m.positional_embedding
    eot = tokens.argmax(dim=-1)
    if insert is not None:
        x = _insert(x, insert)
        eot = eot + insert.shape[-2]
    mask = _causal(x.shape[1])
    if extra_mask is not None:
        mask = mask + _additive(extra_mask)
    for layer, blk in enumerate(m.transformer.resblocks):
        if layer >= 1 and layer in replace:
            x = _set(x, replace[layer])
        if layer >= 1 and layer in add:
            x = _set(x, add[layer], add=True)
        if prefix and layer in prefix:
            x = manual_block(blk, x, prefix[layer], mask)
        else:
            x = blk(x, attn_mask=mask)
    x = m.ln_final(x)
    return x[torch.arange(x.shape[0]), eot] @ m.text_projection


# ---- 1. empty plans reproduce open_clip ---------------------------------------------------------


@pytest.fixture(scope="module", params=["vlprompt-tiny", "ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu"])
def any_backbone(request) -> vlprompt.Backbone:
    return _load(request.param)


def test_empty_plan_reproduces_open_clip(any_backbone):
    bb = any_backbone
    if bb.name.endswith("quickgelu"):
        assert isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    torch.manual_seed(1)
    images = torch.randn(2 if bb.name == "vlprompt-tiny" else 1, 3, bb.image_size, bb.image_size)
    long_text = " ".join(["word"] * 200)  # the tokenizer truncates it: end-of-text at the last position
    batches = [bb.tokenize(TEXTS), bb.tokenize([TEXTS[0], long_text])]
    assert int(batches[1][1].argmax()) == bb.context_length - 1
    with torch.no_grad():
        ours = bb.encode_image(images)
        theirs = bb.model.encode_image(images)
        assert theirs.abs().max() > 1e-2
        _close(ours, theirs)
        _close(bb.encode_image(images, PromptPlan()), theirs)
        for tokens in batches:
            theirs = bb.model.encode_text(tokens)
            _close(bb.encode_text(tokens), theirs)
            _close(bb.encode_text(tokens, PromptPlan()), theirs)


def test_text_tower_truncates_after_last_end_of_text(tiny):
    """Blocks see only up to the last end-of-text token, results equal the full-length computation."""
    tokens = tiny.tokenize(TEXTS)
    keep = int(tokens.argmax(dim=-1).max()) + 1
    assert keep < tiny.context_length
    seen = []
    hook = tiny.text.blocks[0].ln_1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    try:
        with torch.no_grad():
            out = tiny.text(tokens)
            full = tiny.text(tokens, return_tokens=True)
    finally:
        hook.remove()
    assert seen == [keep, tiny.context_length]
    assert full.tokens.shape[1] == tiny.context_length
    _close(out.pooled, full.pooled)
    with torch.no_grad():
        _close(out.pooled, ref_text(tiny, tokens))


def test_manual_block_matches_open_clip_block(tiny):
    """Sanity check of the hand-written reference itself: no prefix means the block's own result."""
    blk = tiny.text.blocks[1]
    x = torch.randn(2, 7, tiny.text_width)
    mask = _causal(7)
    with torch.no_grad():
        _close(manual_block(blk, x, None, mask), blk(x, attn_mask=mask))
        empty = (torch.zeros(0, tiny.text_width), torch.zeros(0, tiny.text_width))
        _close(manual_block(blk, x, empty, mask), blk(x, attn_mask=mask))


# ---- 2. plan semantics (tiny model) -------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tiny) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(2, 3, tiny.image_size, tiny.image_size)


@pytest.mark.parametrize("before_ln_pre", [False, True])
def test_vision_insert_after_cls(tiny, images, before_ln_pre):
    torch.manual_seed(3)
    prompts = torch.randn(3, tiny.vision_width) * 3 + 1  # far from layer-normalised, so ln_pre matters
    plan = PromptPlan(insert=prompts, insert_before_ln_pre=before_ln_pre)
    with torch.no_grad():
        out = tiny.vision(images, plan, return_tokens=True)
        ref = ref_vision(tiny, images, insert=prompts, before_ln_pre=before_ln_pre)
        other = ref_vision(tiny, images, insert=prompts, before_ln_pre=not before_ln_pre)
    assert out.tokens.shape == (2, 65 + 3, tiny.vision_width)
    _close(out.pooled, ref)
    _differs(ref, other)
    _differs(ref, ref_vision(tiny, images))


def test_vision_replace_and_add(tiny, images):
    torch.manual_seed(4)
    d = tiny.vision_width
    insert = torch.randn(2, d)
    replace = {2: torch.randn(2, d), 3: torch.randn(2, d)}
    add = {1: torch.randn(2, d), 3: torch.randn(2, d)}
    with torch.no_grad():
        out = tiny.encode_image(images, PromptPlan(insert=insert, replace=replace, add=add))
        ref = ref_vision(tiny, images, insert=insert, replace=replace, add=add)
        _close(out, ref)
        _differs(ref, ref_vision(tiny, images, insert=insert, replace=replace))
        _differs(ref, ref_vision(tiny, images, insert=insert, add=add))
        # without insertion, layer-0 replace overwrites patch tokens after ln_pre
        replace0 = {0: torch.randn(4, d)}
        _close(tiny.encode_image(images, PromptPlan(replace=replace0)), ref_vision(tiny, images, replace=replace0))


def test_text_replace_at_layer0_acts_on_word_embeddings(tiny):
    torch.manual_seed(5)
    tokens = tiny.tokenize(["x x x x a red square", "x x x x dog"])
    ctx = torch.randn(4, tiny.text_width)
    with torch.no_grad():
        out = tiny.encode_text(tokens, PromptPlan(replace={0: ctx}))
        ref = ref_text(tiny, tokens, replace={0: ctx})
        _close(out, ref)
        # acting on hidden states (after the positional embedding) would give something else
        m = tiny.model
        x = _set(m.token_embedding(tokens) + m.positional_embedding, ctx)
        for blk in m.transformer.resblocks:
            x = blk(x, attn_mask=_causal(x.shape[1]))
        wrong = m.ln_final(x)[torch.arange(2), tokens.argmax(-1)] @ m.text_projection
        _differs(ref, wrong)


def test_text_deep_replace_add_and_insert(tiny):
    torch.manual_seed(6)
    d = tiny.text_width
    tokens = tiny.tokenize(["x x a red square", "x x dog"])
    replace = {0: torch.randn(2, d), 1: torch.randn(2, d), 3: torch.randn(2, d)}
    add = {0: torch.randn(2, d), 2: torch.randn(2, d)}
    with torch.no_grad():
        _close(
            tiny.encode_text(tokens, PromptPlan(replace=replace, add=add)),
            ref_text(tiny, tokens, replace=replace, add=add),
        )
        ref_hidden = ref_text(tiny, tokens, replace={1: replace[1]})
        _close(tiny.encode_text(tokens, PromptPlan(replace={1: replace[1]})), ref_hidden)
        _differs(ref_hidden, ref_text(tiny, tokens))
        insert = torch.randn(3, d)
        ref_ins = ref_text(tiny, tokens, insert=insert)
        _close(tiny.encode_text(tokens, PromptPlan(insert=insert)), ref_ins)
        _differs(ref_ins, ref_text(tiny, tokens))


def test_vision_prefix_tokens(tiny, images):
    torch.manual_seed(7)
    d = tiny.vision_width
    prefix = {0: (torch.randn(5, d), torch.randn(5, d)), 2: (torch.randn(3, d), torch.randn(3, d))}
    with torch.no_grad():
        ref = ref_vision(tiny, images, prefix=prefix)
        _close(tiny.encode_image(images, PromptPlan(prefix=prefix)), ref)
        _differs(ref, ref_vision(tiny, images))


def test_text_prefix_tokens_visible_to_every_query(tiny):
    torch.manual_seed(8)
    d = tiny.text_width
    tokens = tiny.tokenize(TEXTS)
    # shared at layer 1, per sample at layer 3
    prefix = {1: (torch.randn(4, d), torch.randn(4, d)), 3: (torch.randn(3, 4, d), torch.randn(3, 4, d))}
    with torch.no_grad():
        ref = ref_text(tiny, tokens, prefix=prefix)
        _close(tiny.encode_text(tokens, PromptPlan(prefix=prefix)), ref)
        _differs(ref, ref_text(tiny, tokens))
        # the first token can only see itself and the prefix: its output changes with the prefix
        plain = tiny.text(tokens, return_tokens=True).tokens[:, 0]
        prefixed = tiny.text(tokens, PromptPlan(prefix={0: prefix[1]}), return_tokens=True).tokens[:, 0]
        _differs(plain, prefixed)


def test_vision_attn_mask(tiny, images):
    length = 65
    mask = torch.ones(length, length, dtype=torch.bool)
    mask[:, 5:20] = False  # nobody attends to patches 4..18
    mask[3, :] = False
    mask[3, 3] = True  # patch 2 attends only to itself
    with torch.no_grad():
        ref = ref_vision(tiny, images, mask=_additive(mask))
        _close(tiny.encode_image(images, PromptPlan(attn_mask=mask)), ref)
        _close(tiny.encode_image(images, PromptPlan(attn_mask=_additive(mask))), ref)
        plain = tiny.encode_image(images)
        _differs(ref, plain)
        _close(tiny.encode_image(images, PromptPlan(attn_mask=torch.ones(length, length, dtype=torch.bool))), plain)
        # per-sample masks [B, L, L]: each row as if encoded alone with its own mask
        per_sample = torch.stack([mask, torch.ones(length, length, dtype=torch.bool)])
        out = tiny.encode_image(images, PromptPlan(attn_mask=per_sample))
        _close(out[0], ref[0])
        _close(out[1], plain[1])


def test_text_attn_mask(tiny):
    tokens = tiny.tokenize(TEXTS)
    length = tiny.context_length
    mask = torch.ones(length, length, dtype=torch.bool)
    mask[4:, 1:3] = False  # later tokens may not look at the first two words
    with torch.no_grad():
        ref = ref_text(tiny, tokens, extra_mask=mask)
        _close(tiny.encode_text(tokens, PromptPlan(attn_mask=mask)), ref)
        plain = tiny.encode_text(tokens)
        _differs(ref[1], plain[1])
        _close(tiny.encode_text(tokens, PromptPlan(attn_mask=torch.ones(length, length, dtype=torch.bool))), plain)


def test_prefix_combined_with_attn_mask(tiny, images):
    torch.manual_seed(9)
    d = tiny.vision_width
    prefix = {1: (torch.randn(4, d), torch.randn(4, d))}
    mask = torch.ones(65, 65, dtype=torch.bool)
    mask[:, 10:30] = False
    with torch.no_grad():
        ref = ref_vision(tiny, images, prefix=prefix, mask=_additive(mask))
        _close(tiny.encode_image(images, PromptPlan(prefix=prefix, attn_mask=mask)), ref)
        tokens = tiny.tokenize(TEXTS)
        tmask = torch.ones(tiny.context_length, tiny.context_length, dtype=torch.bool)
        tmask[5:, 2] = False
        tprefix = {2: (torch.randn(3, tiny.text_width), torch.randn(3, tiny.text_width))}
        ref = ref_text(tiny, tokens, prefix=tprefix, extra_mask=tmask)
        _close(tiny.encode_text(tokens, PromptPlan(prefix=tprefix, attn_mask=tmask)), ref)


def _full_vision_plan(tokens, kv):
    return PromptPlan(insert=tokens, replace={1: tokens}, add={2: tokens}, prefix={3: (kv, -kv)})


def test_per_sample_tokens_match_shared(tiny, images):
    torch.manual_seed(10)
    d = tiny.vision_width
    tokens, kv = torch.randn(3, d), torch.randn(2, d)
    with torch.no_grad():
        shared = tiny.encode_image(images, _full_vision_plan(tokens, kv))
        per_sample = tiny.encode_image(images, _full_vision_plan(tokens.expand(2, -1, -1), kv.expand(2, -1, -1)))
        _close(per_sample, shared)
        # different rows: each sample gets its own prompts
        tokens2, kv2 = torch.randn(3, d), torch.randn(2, d)
        mixed = tiny.encode_image(images, _full_vision_plan(torch.stack([tokens, tokens2]), torch.stack([kv, kv2])))
        _close(mixed[0], shared[0])
        _close(mixed[1], tiny.encode_image(images, _full_vision_plan(tokens2, kv2))[1])
        _differs(mixed[1], shared[1])
        text = tiny.tokenize(TEXTS[:2])
        ctx = torch.randn(2, tiny.text_width)
        _close(
            tiny.encode_text(text, PromptPlan(replace={0: ctx, 2: ctx})),
            tiny.encode_text(text, PromptPlan(replace={0: ctx.expand(2, -1, -1), 2: ctx.expand(2, -1, -1)})),
        )
        with pytest.raises(ValueError):
            tiny.encode_image(images, PromptPlan(insert=torch.randn(3, 3, d)))


def test_frames_are_encoded_as_images(tiny):
    torch.manual_seed(11)
    frames = torch.randn(2, 3, 3, tiny.image_size, tiny.image_size)
    plan = PromptPlan(insert=torch.randn(2, tiny.vision_width))
    with torch.no_grad():
        out = tiny.encode_image(frames, plan)
        flat = tiny.encode_image(frames.flatten(0, 1), plan)
    assert out.shape == (2, 3, tiny.embed_dim)
    _close(out.flatten(0, 1), flat)


def test_plan_beyond_tower_depth_raises(tiny, images):
    depth = tiny.vision.num_layers
    d = tiny.vision_width
    with pytest.raises(ValueError, match="layer 4"):
        tiny.encode_image(images, PromptPlan(replace={depth: torch.zeros(1, d)}))
    with pytest.raises(ValueError, match="layer"):
        tiny.encode_image(images, PromptPlan(prefix={depth: (torch.zeros(1, d), torch.zeros(1, d))}))
    with pytest.raises(ValueError, match="layer"):
        tiny.encode_text(tiny.tokenize(["a"]), PromptPlan(add={tiny.text.num_layers: torch.zeros(1, tiny.text_width)}))


def test_span_beyond_sequence_raises(tiny, images):
    with pytest.raises(ValueError, match="exceeds sequence length"):
        tiny.encode_image(images, PromptPlan(replace={1: torch.zeros(65, tiny.vision_width)}))
    with pytest.raises(ValueError, match="exceeds sequence length"):
        tiny.encode_text(
            tiny.tokenize(["a"]), PromptPlan(replace={0: torch.zeros(tiny.context_length, tiny.text_width)})
        )


def test_text_span_longer_than_the_caption_is_not_truncated_away(tiny):
    """Truncation keeps every prompt position even when the prompt runs past the last end-of-text."""
    tokens = tiny.tokenize(["a"])  # end-of-text at position 2
    ctx = torch.randn(6, tiny.text_width)
    with torch.no_grad():
        out = tiny.encode_text(tokens, PromptPlan(replace={2: ctx}))
        _close(out, ref_text(tiny, tokens, replace={2: ctx}))


def test_gradients_reach_prompts_not_frozen_backbone(tiny, images):
    torch.manual_seed(12)
    d, t = tiny.vision_width, tiny.text_width
    vis = torch.randn(3, d, requires_grad=True)
    vis_deep = torch.randn(3, d, requires_grad=True)
    vk, vv = torch.randn(2, d, requires_grad=True), torch.randn(2, d, requires_grad=True)
    ctx = torch.randn(2, t, requires_grad=True)
    deep = torch.randn(2, t, requires_grad=True)
    tk, tv = torch.randn(2, t, requires_grad=True), torch.randn(2, t, requires_grad=True)
    img = tiny.encode_image(images, PromptPlan(insert=vis, add={2: vis_deep}, prefix={1: (vk, vv)}))
    txt = tiny.encode_text(tiny.tokenize(TEXTS[:2]), PromptPlan(replace={0: ctx, 1: deep}, prefix={2: (tk, tv)}))
    (img * txt.detach()).sum().backward()
    (txt * img.detach()).sum().backward()
    for tensor in (vis, vis_deep, vk, vv, ctx, deep, tk, tv):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in tiny.parameters())


def test_grad_checkpointing_gives_same_outputs_and_gradients(monkeypatch, images):
    bb = _load("vlprompt-tiny")  # not frozen: compare backbone gradients too
    calls = []
    real = towers_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(towers_module, "checkpoint", spy)
    torch.manual_seed(13)
    vis = torch.randn(3, bb.vision_width, requires_grad=True)
    kv = torch.randn(2, bb.vision_width, requires_grad=True)
    ctx = torch.randn(2, bb.text_width, requires_grad=True)
    tokens = bb.tokenize(TEXTS[:2])

    def step():
        for tensor in (vis, kv, ctx, *bb.parameters()):
            tensor.grad = None
        img = bb.encode_image(images, PromptPlan(insert=vis, replace={2: vis}, prefix={1: (kv, kv * 2)}))
        txt = bb.encode_text(tokens, PromptPlan(replace={0: ctx, 3: ctx}, prefix={1: (ctx, ctx)}))
        (img @ txt.T).square().sum().backward()
        grads = [t.grad.clone() for t in (vis, kv, ctx)]
        grads += [p.grad.clone() if p.grad is not None else None for p in bb.parameters()]
        return img.detach(), txt.detach(), grads

    img0, txt0, grads0 = step()
    assert not calls
    bb.set_grad_checkpointing(True)
    img1, txt1, grads1 = step()
    assert len(calls) == bb.vision.num_layers + bb.text.num_layers
    _close(img1, img0)
    _close(txt1, txt0)
    assert any(g is not None for g in grads0[3:])
    for g0, g1 in zip(grads0, grads1):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)
    # no checkpointing without autograd
    calls.clear()
    with torch.no_grad():
        bb.encode_image(images)
    assert not calls


def test_masks_take_the_requested_dtype():
    """Bool and float masks become additive masks of the hidden states' dtype (float64 here, not the default)."""
    allowed = torch.tensor([[True, False], [True, True]])
    out = towers_module.combine_masks(allowed, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert out[0, 1] == float("-inf") and out[0, 0] == 0.0
    assert towers_module.combine_masks(torch.zeros(2, 2), dtype=torch.float64).dtype == torch.float64
    causal = towers_module.causal_mask(3, torch.device("cpu"), torch.float64)
    assert causal.dtype == torch.float64 and causal[0, 1] == float("-inf") and causal[1, 0] == 0.0


def test_set_grad_checkpointing_enables_by_default(tiny):
    tower = tiny.vision
    try:
        tower.set_grad_checkpointing()
        assert tower.grad_checkpointing is True
    finally:
        tower.set_grad_checkpointing(False)


def test_project_tokens_without_a_projection_is_ln_post_only(tiny):
    tower = tiny.vision
    x = torch.randn(2, 5, tiny.vision_width)
    proj = tower.visual.proj
    try:
        tower.visual.proj = None
        out = tower.project_tokens(x)
    finally:
        tower.visual.proj = proj
    assert torch.allclose(out, tower.visual.ln_post(x), atol=ATOL)


def test_project_tokens_is_ln_post_and_projection_of_every_token(tiny):
    """``project_tokens`` applies ``ln_post`` and ``proj`` to each token: its CLS row is the pooled embedding."""
    x = torch.randn(2, 5, tiny.vision_width)
    out = tiny.vision.project_tokens(x)
    v = tiny.vision.visual
    assert out.shape == (2, 5, tiny.embed_dim)
    assert torch.allclose(out, v.ln_post(x) @ v.proj, atol=ATOL)
    assert torch.allclose(out[:, 0], tiny.vision.project(x), atol=ATOL)


@pytest.mark.parametrize(
    "pool_type,expected",
    [("argmax", [3, 1]), ("eos", [2, 1]), ("last", [4, 4]), ("first", [0, 0])],
)
def test_text_pool_positions_per_pool_type(tiny, pool_type, expected):
    """argmax: the highest id (CLIP's end-of-text); eos: the first ``eos_id``; last: the final position; others: 0."""
    tower = tiny.text
    saved = tower.pool_type, tower.eos_id
    tokens = torch.tensor([[1, 4, 7, 9, 7], [2, 7, 3, 0, 0]])  # eos_id 7 first at 2 and 1; max id at 3 and 1
    try:
        tower.pool_type, tower.eos_id = pool_type, 7
        positions = tower.pool_positions(tokens)
        assert positions.tolist() == expected and positions.dtype == torch.long  # row indices
    finally:
        tower.pool_type, tower.eos_id = saved


def test_text_tower_reads_a_custom_text_clips_text_transformer():
    """CustomTextCLIP keeps its text transformer under ``model.text``; the tower must encode it like open_clip."""
    torch.manual_seed(0)
    vision_cfg = dict(layers=1, width=64, patch_size=32, image_size=64, head_width=32)
    text_cfg = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
    model = open_clip.CustomTextCLIP(32, vision_cfg, text_cfg)
    model.eval()
    tokens = torch.randint(1, 99, (2, 16))
    with torch.no_grad():
        assert torch.allclose(towers_module.TextTower(model)(tokens).pooled, model.encode_text(tokens), atol=ATOL)


def test_towers_refuse_modules_they_cannot_loop_over():
    only_conv = torch.nn.Module()
    only_conv.conv1 = torch.nn.Conv2d(3, 4, 2)  # e.g. a ResNet: a stem but no transformer
    with pytest.raises(TypeError, match="VisionTransformer"):
        towers_module.VisionTower(only_conv)
    no_embedding = torch.nn.Module()  # neither token_embedding nor cls_emb
    with pytest.raises(TypeError, match="CLIP text transformer"):
        towers_module.TextTower(no_embedding)


@pytest.mark.parametrize(
    "custom,text_extra",
    [
        (False, dict(pool_type="last", no_causal_mask=True)),  # SigLIP-style: last token, full attention
        (False, dict(pool_type="eos", eos_id=3)),
        (True, dict(pool_type="eos", eos_id=3)),
        (True, dict(pool_type="last")),
        (False, dict(pool_type="first")),
    ],
)
def test_text_tower_pools_the_token_open_clip_pools(custom, text_extra):
    """The pooled token (first ``eos_id``, last position, ...) and the causal mask are read from the model's config
    (``text_pool_type`` / ``pool_type``, ``text_eos_id`` / ``eos_id``, ``attn_mask``), CLIP and CustomTextCLIP
    alike. The captions put the largest id, the end-of-text id and the last position in different places."""
    torch.manual_seed(0)
    vision_cfg = dict(layers=1, width=64, patch_size=32, image_size=64, head_width=32)
    text_cfg = dict(context_length=8, vocab_size=50, width=64, heads=2, layers=2, **text_extra)
    model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(32, vision_cfg, text_cfg).eval()
    tokens = torch.tensor([[1, 5, 3, 9, 0, 0, 0, 0], [1, 3, 4, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(towers_module.TextTower(model)(tokens).pooled, model.encode_text(tokens), atol=ATOL)


def test_text_tower_refuses_cls_token_and_padding_mask_text_models():
    for attr in ("cls_emb", "use_pad_mask"):
        text = torch.nn.Module()
        text.token_embedding = torch.nn.Embedding(4, 2)
        setattr(text, attr, torch.nn.Parameter(torch.zeros(2)) if attr == "cls_emb" else True)
        with pytest.raises(TypeError):
            towers_module.TextTower(text)


def test_text_insert_moves_the_pooled_end_of_text_of_an_empty_caption(tiny):
    """With inserted tokens the end-of-text moves behind them even when it sits right at the insert position (an
    empty caption: start-of-text, end-of-text), so the pooled token is still the end-of-text token."""
    torch.manual_seed(9)
    tokens = tiny.tokenize(["", "a dog"])
    insert = torch.randn(3, tiny.text_width)
    with torch.no_grad():
        _close(tiny.encode_text(tokens, PromptPlan(insert=insert)), ref_text(tiny, tokens, insert=insert))


# ---- 3. paired towers in lock-step (LPI grounding's per-layer interaction) ---------------------------


def _lpi_like_plans(tiny, n: int = 2) -> tuple[PromptPlan, PromptPlan]:
    torch.manual_seed(8)
    dv, dt = tiny.vision_width, tiny.text_width
    vplan = PromptPlan(insert=torch.randn(n, dv), add={1: torch.randn(n, dv), 2: torch.randn(n, dv)})
    tplan = PromptPlan(replace={0: torch.randn(n, dt)}, add={1: torch.randn(n, dt)})
    return vplan, tplan


def test_paired_towers_with_a_neutral_hook_equal_the_towers_alone(tiny, images):
    tokens = tiny.tokenize(["x x a red square", "x x dog"])
    vplan, tplan = _lpi_like_plans(tiny)
    seen: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []

    def neutral(layer, xv, xt):
        seen.append((layer, tuple(xv.shape), tuple(xt.shape)))
        return xv, xt

    with torch.no_grad():
        vis, txt = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, vplan, tplan, neutral)
        alone_v = tiny.vision(images, vplan, return_tokens=True)
        alone_t = tiny.text(tokens, tplan)
    _close(vis.pooled, alone_v.pooled)
    _close(vis.tokens, alone_v.tokens)
    _close(txt.pooled, alone_t.pooled)
    # the hook sees every shared layer once, in order, with both sequences of the batch (prompts included)
    assert [s[0] for s in seen] == list(range(min(tiny.vision.num_layers, tiny.text.num_layers)))
    assert all(s[1] == (2, 65 + 2, tiny.vision_width) and s[2][0] == 2 and s[2][2] == tiny.text_width for s in seen)


def test_paired_hook_runs_after_the_plans_writes_and_before_the_block(tiny, images):
    """Overwriting text tokens 1..2 in the hook at layer 1 equals a plan that replaces them at layer 1: the add of
    layer 1 came first and was overwritten, and block 1 saw the hook's values."""
    tokens = tiny.tokenize(["x x a red square", "x x dog"])
    vplan, tplan = _lpi_like_plans(tiny)
    z_t, z_v = torch.randn(2, tiny.text_width), torch.randn(2, tiny.vision_width)

    def overwrite(layer, xv, xt):
        if layer == 1:
            xt = xt.clone()
            xt[:, 1:3] = z_t
            xv = xv.clone()
            xv[:, 1:3] = z_v
        return xv, xt

    with torch.no_grad():
        vis, txt = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, vplan, tplan, overwrite)
        want_t = tiny.text(tokens, PromptPlan(replace={0: tplan.replace[0], 1: z_t}))
        want_v = tiny.vision(images, PromptPlan(insert=vplan.insert, replace={1: z_v}, add={2: vplan.add[2]}))
        _close(txt.pooled, want_t.pooled)
        _close(vis.pooled, want_v.pooled)
        _differs(txt.pooled, tiny.text(tokens, tplan).pooled)


def test_paired_hook_couples_the_modalities(tiny, images):
    """A hook that writes vision into text makes the text output depend on the image (and only then)."""
    tokens = tiny.tokenize(["x x a red square", "x x a red square"])
    _, tplan = _lpi_like_plans(tiny)
    proj = torch.randn(tiny.vision_width, tiny.text_width) * 0.1

    def v2t(layer, xv, xt):
        xt = xt.clone()
        xt[:, 1:3] = xt[:, 1:3] + xv[:, 1:3] @ proj
        return xv, xt

    with torch.no_grad():
        same = torch.stack([images[0], images[0]])
        _, txt = towers_module.run_paired(tiny.vision, tiny.text, same, tokens, None, tplan, v2t)
        _close(txt.pooled[0], txt.pooled[1])  # same image, same caption
        _, txt2 = towers_module.run_paired(tiny.vision, tiny.text, images, tokens, None, tplan, v2t)
        _differs(txt2.pooled[0], txt2.pooled[1])  # same caption, different images


def test_paired_towers_refuse_unpaired_batches(tiny, images):
    tokens = tiny.tokenize(["a", "b", "c"])
    with pytest.raises(ValueError, match="paired towers"):
        towers_module.run_paired(tiny.vision, tiny.text, images, tokens, None, None, lambda i, v, t: (v, t))
    with pytest.raises(ValueError, match="global video tokens"):
        plan = PromptPlan(global_tokens=torch.zeros(1, tiny.vision_width))
        towers_module.run_paired(tiny.vision, tiny.text, images, tokens[:2], plan, None, lambda i, v, t: (v, t))
