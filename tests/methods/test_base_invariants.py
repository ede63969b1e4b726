"""Invariants of the method base class that a one-line change would break (issue 14, mutation testing): what text
the towers see, how videos are pooled (CLIP4Clip's meanP over valid frames), the loss, and what counts as trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import vlprompt
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import Plans

from .golden import build_backbone


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _video(bb: vlprompt.Backbone, frames: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, frames, 3, bb.image_size, bb.image_size)


def test_tokenize_puts_placeholders_before_and_the_suffix_after_each_caption(tiny):
    method = build_method({"name": "zeroshot"}, tiny)
    assert torch.equal(method.tokenize(["a red square"]), tiny.tokenize(["a red square"]))
    method.n_placeholders, method.caption_suffix = 3, "."
    assert torch.equal(method.tokenize(["a red square", "b"]), tiny.tokenize(["X X X a red square.", "X X X b."]))
    method.max_words = 6
    ids = method.tokenize(["a red square"])
    assert ids.shape == (1, 6) and torch.equal(ids, tiny.tokenize(["X X X a red square."], 6))


def test_video_embedding_is_the_mean_of_normalised_frame_embeddings_over_valid_frames(tiny):
    method = build_method({"name": "zeroshot"}, tiny)
    video = _video(tiny)
    with torch.no_grad():
        frames = F.normalize(tiny.vision(video, None).pooled, dim=-1)  # [B, T, E]
        torch.testing.assert_close(method.encode_video(video), F.normalize(frames.mean(1), dim=-1))
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        want = torch.stack([frames[0, :2].mean(0), frames[1, 0]])
        torch.testing.assert_close(method.encode_video(video, mask), F.normalize(want, dim=-1))
        torch.testing.assert_close(method.encode_visual(video, mask), F.normalize(want, dim=-1))
        empty = method.encode_video(video, torch.zeros(2, 3))  # no valid frame: a zero vector, not NaN
        assert torch.isfinite(empty).all() and float(empty.abs().max()) == 0.0
        images = video[:, 0]
        torch.testing.assert_close(method.encode_visual(images), F.normalize(tiny.encode_image(images), dim=-1))


def test_forward_is_clip_loss_of_the_normalised_embeddings_at_clips_scale(tiny):
    method = build_method({"name": "coop", "n_ctx": 2}, tiny)
    images = _video(tiny)[:, 0]
    tokens = method.tokenize(["a red square", "a blue circle"])
    with torch.no_grad():
        loss = method(images, tokens)
        plans = method.plans()
        want = ClipLoss()(method.encode_image(images, plans), method.encode_text(tokens, plans), tiny.logit_scale)
    torch.testing.assert_close(loss, want)
    assert torch.equal(method.logit_scale, tiny.logit_scale)


def test_trainable_state_and_counts(tiny):
    method = build_method({"name": "coop", "n_ctx": 2}, tiny)
    assert set(method.trainable_state_dict()) == {"context.ctx"}
    counts = method.parameter_counts()
    assert counts["trainable"] == 2 * tiny.text_width
    assert counts["total"] == sum(p.numel() for p in tiny.model.parameters()) + 2 * tiny.text_width


def test_word_embeddings_are_the_first_n_word_tokens(tiny):
    method = build_method({"name": "zeroshot"}, tiny)
    ids = tiny.tokenize(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        torch.testing.assert_close(method.word_embeddings("a photo of a", 4), tiny.text.token_embedding(ids))
        torch.testing.assert_close(method.word_embeddings("a photo of a", 2), tiny.text.token_embedding(ids[:2]))
        torch.testing.assert_close(method.word_embeddings("a photo", 2), tiny.text.token_embedding(ids[:2]))
    with pytest.raises(ConfigError, match=r"ctx_init 'a photo' has 2 word tokens, fewer than n_ctx=3"):
        method.word_embeddings("a photo", 3)


def test_words_that_fill_the_context_without_an_end_token_all_count(tiny, monkeypatch):
    """A tokenizer that truncates away the end token: every position after the start token is a word."""
    method = build_method({"name": "zeroshot"}, tiny)
    sot, eot = tiny.tokenize([""])[0, :2].tolist()
    full = torch.tensor([[sot, 320, 1125, 539, 320]])  # "a photo of a", no end token
    monkeypatch.setattr(tiny, "tokenize", lambda texts: full if texts[0] else torch.tensor([[sot, eot, 0, 0, 0]]))
    with torch.no_grad():
        torch.testing.assert_close(method.word_embeddings("a photo of a", 4), tiny.text.token_embedding(full[0, 1:]))
    with pytest.raises(ConfigError, match="has 4 word tokens"):
        method.word_embeddings("a photo of a", 5)


@pytest.mark.parametrize("name", ["coop", "maple", "tpt"])
@pytest.mark.parametrize("pool_type", ["argmax", "last"])
def test_too_short_init_words_are_refused_whatever_token_the_tower_pools(name, pool_type):
    """Where the words end is read from the tokens: a last-token-pooled (SigLIP-style) tower pools the final
    position, and reading the words up to there would initialise the context from end-of-text and padding."""
    torch.manual_seed(0)
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "pool_type": pool_type}
    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}
    bb = build_backbone({"embed_dim": 32, "vision_cfg": vision, "text_cfg": text})
    assert bb.text.pool_type == pool_type
    method = build_method({"name": "zeroshot"}, bb)
    with torch.no_grad():
        words = bb.text.token_embedding(bb.tokenize(["a photo of a"])[0, 1:5])
    torch.testing.assert_close(method.word_embeddings("a photo of a", 4), words)
    with pytest.raises(ConfigError, match="fewer than n_ctx=4"):
        build_method({"name": name, "n_ctx": 4, "ctx_init": "a photo"}, bb)
    text_long = "a " * 20  # fills the context: every position after the start token but the last is a word
    assert method.word_embeddings(text_long, 14).shape == (14, 64)
    with pytest.raises(ConfigError, match="has 14 word tokens"):
        method.word_embeddings(text_long, 15)


def test_encoders_use_the_plans_they_are_given(tiny):
    """Routed evaluation passes another task's plans: the encoders must not fall back to the current ones."""
    empty = Plans()  # no prompts at all: the frozen CLIP
    vpt = build_method({"name": "vpt", "n_tokens": 2}, tiny)
    coop = build_method({"name": "coop", "n_ctx": 2}, tiny)
    video = _video(tiny)
    tokens = coop.tokenize(["a red square", "a blue circle"])
    with torch.no_grad():
        frozen_images = F.normalize(tiny.encode_image(video[:, 0]), dim=-1)
        torch.testing.assert_close(vpt.encode_image(video[:, 0], empty), frozen_images)
        torch.testing.assert_close(vpt.encode_visual(video[:, 0], None, empty), frozen_images)
        assert not torch.allclose(vpt.encode_image(video[:, 0]), frozen_images, atol=1e-4)
        frames = F.normalize(tiny.vision(video, None).pooled, dim=-1)
        torch.testing.assert_close(vpt.encode_video(video, None, empty), F.normalize(frames.mean(1), dim=-1))
        torch.testing.assert_close(vpt.encode_visual(video, None, empty), F.normalize(frames.mean(1), dim=-1))
        assert not torch.allclose(vpt.encode_video(video), F.normalize(frames.mean(1), dim=-1), atol=1e-4)
        torch.testing.assert_close(coop.encode_text(tokens, empty), F.normalize(tiny.encode_text(tokens), dim=-1))
        assert not torch.allclose(coop.encode_text(tokens), F.normalize(tiny.encode_text(tokens), dim=-1), atol=1e-4)


def test_options_default_and_video_training_reads_the_mask(tiny):
    from vlprompt.methods.coop import CoOp

    assert isinstance(CoOp(tiny).options, CoOp.Options)  # built without options: the defaults
    method = build_method({"name": "vpt", "n_tokens": 2}, tiny)
    video = _video(tiny)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tokens = method.tokenize(["a red square", "a blue circle"])
    with torch.no_grad():
        loss = method(video, tokens, mask)
        want = ClipLoss()(method.encode_video(video, mask), method.encode_text(tokens), tiny.logit_scale)
    torch.testing.assert_close(loss, want)


def _start_tokenless() -> vlprompt.Backbone:
    """A SigLIP-style micro CLIP: last-token pooling, full attention, and a tokenizer without a start token."""
    import open_clip

    torch.manual_seed(0)
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "pool_type": "last",
            "no_causal_mask": True}  # fmt: skip
    vision = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    model = open_clip.CLIP(32, vision, text).eval()
    clip_tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)

    def tokenizer(texts, context_length=None):
        tokens = clip_tokenizer(texts, context_length=context_length)
        return torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)  # no start-of-text

    return vlprompt.Backbone(model, tokenizer)


def test_text_prompts_go_to_the_first_word_of_tokenizers_without_a_start_token():
    """With no start-of-text token the words begin at position 0: CoOp's context replaces the placeholders there
    (not the first real word) and ``ctx_init`` reads the first words from there."""
    from vlprompt.backbone.backbone import first_word_position

    bb = _start_tokenless()
    assert bb.text.first_position == first_word_position(bb.tokenizer) == 0
    assert vlprompt.load_backbone("vlprompt-tiny", pretrained=None).text.first_position == 1  # CLIP's start token
    method = build_method({"name": "coop", "n_ctx": 2, "ctx_init": "a photo of a"}, bb)
    tokens = method.tokenize(["a red square"])
    assert torch.equal(tokens, bb.tokenizer(["X X a red square"]))
    with torch.no_grad():
        words = bb.tokenizer(["a photo of a"])[0, :2]
        torch.testing.assert_close(method.context.ctx, bb.text.token_embedding(words).float())
        ctx = torch.randn(2, 64)
        method.context.ctx.copy_(ctx)
        got = method.encode_text(tokens)
        m = bb.model
        x = torch.cat([ctx[None], m.token_embedding(tokens)[:, 2:]], dim=1) + m.positional_embedding
        for block in m.transformer.resblocks:
            x = block(x)
        want = F.normalize(m.ln_final(x)[:, -1] @ m.text_projection, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="has 2 word tokens"):
        method.word_embeddings("a photo", 3)
