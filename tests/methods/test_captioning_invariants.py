"""Captioning invariants that a one-line change would break (issue 14, mutation testing): the teacher-forcing
layouts' edge cases (one-token captions, compact vocabularies, the reference's training mean), CapDec's noise
(formula, global RNG by default, which embedding it touches), which layout ``tokenize`` trains on, the captioner
the options build, the mapper loaders, CLIP text embeddings, the decoding options (greedy, ``max_new_tokens``) and
RLCF-captioning's episode (given reward features kept, no reward needed to caption)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbone.caption_helpers import tiny_captioner, tiny_lm
from runners.caption_setup import save_tiny_lm
from vlprompt.backbone import load_backbone
from vlprompt.backbone.captioner import (
    Captioner,
    CaptionTokenizer,
    MapperConfig,
    MLPMapper,
    TransformerMapper,
    build_mapper,
    mapper_state_to_reference,
)
from vlprompt.backbone.embedded_captioner import save_mapper_weights
from vlprompt.errors import ConfigError
from vlprompt.methods.captioning import (
    CAPDEC_NOISE_VARIANCE,
    CapDec,
    CapDecOptions,
    CaptionerOptions,
    Captioning,
    CaptioningOptions,
    caption_losses,
    noisy_embedding,
    teacher_forcing,
)
from vlprompt.methods.rlcf import reward_specs
from vlprompt.methods.rlcf_caption import RLCFCaption, RLCFCaptionOptions

SHORT, LONG = "a dog", "a red square on a table"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


def _images(clip, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(seed))


def _method(cls, options, clip, **captioner):
    return cls(clip, options, captioner=tiny_captioner(clip_dim=clip.embed_dim, **captioner))


# ---- the option defaults (RLCF spec section 2c) ------------------------------------------------------------------
def test_option_defaults_are_rlcfs_captioner_and_capdecs_noise() -> None:
    o = CaptionerOptions()
    assert (o.lm, o.mapper, o.prefix_length, o.clip_length, o.mapper_layers, o.mapper_heads) == (
        "facebook/opt-125m", "transformer", 40, 40, 8, 8,
    )  # fmt: skip
    assert (o.normalize_input, o.max_new_tokens, o.final_beams, o.lm_dtype) == (True, 50, 5, "fp32")
    clipcap, capdec = CaptioningOptions(), CapDecOptions()
    assert (clipcap.embedding, clipcap.noise_variance, clipcap.reference_loss_quirks) == ("image", 0.0, False)
    assert (capdec.embedding, capdec.noise_variance) == ("text", 0.016) and CAPDEC_NOISE_VARIANCE == 0.016
    rlcf = RLCFCaptionOptions()
    assert (rlcf.sample_k, rlcf.reference_loss_quirks, rlcf.final_beams) == (10, False, 5)  # ClipCap's K (c2f)


# ---- teacher forcing -------------------------------------------------------------------------------------------
def test_a_one_token_caption_without_bos_is_predicted_from_the_last_prefix_slot() -> None:
    """GPT-2's layout (no BOS): the input is the caption alone, one token wide; the last prefix slot predicts it
    and the token predicts eos (no pad column may shift the predicting positions)."""
    cap = tiny_captioner("gpt2")
    tok = cap.tokenizer
    assert tok.bos_id is None and len(tok.encode(["a"])[0]) == 1
    prefix = cap.prefix(torch.randn(1, 16, generator=torch.Generator().manual_seed(0)))
    ids = tok.encode(["a"])[0]
    embeds = torch.cat([prefix, cap.lm.get_input_embeddings()(torch.tensor([ids]))], dim=1)
    logits = cap.lm(inputs_embeds=embeds).logits[0, prefix.shape[1] - 1 :]
    expected = F.cross_entropy(logits, torch.tensor(ids + [tok.eos_id]))
    got = caption_losses(cap, prefix, teacher_forcing(tok, ["a"]))
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)


def test_a_compact_vocabulary_under_100_tokens_trains_on_captions_of_unequal_length() -> None:
    """Compact BPE vocabularies (the embedded world LM's kind) can hold fewer than 100 rows: the clean layout's pads
    must be cross_entropy's ignored index, not a token id, and a caption's loss does not depend on its batch."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    words = sorted({i for t in (SHORT, LONG) for i in bpe.encode(t)})
    tok = CaptionTokenizer.clip_bpe([bpe.sot_token_id, bpe.eot_token_id, *words])
    assert tok.vocab_size < 100
    torch.manual_seed(1)
    cap = Captioner(build_mapper(MapperConfig("transformer", 16, 32, 4, 3, 2, 4)), tiny_lm("opt", tok.vocab_size), tok)
    prefix = cap.prefix(torch.randn(1, 16, generator=torch.Generator().manual_seed(0)))
    batched = caption_losses(cap, prefix, teacher_forcing(tok, [SHORT, LONG]))
    alone = caption_losses(cap, prefix, teacher_forcing(tok, [SHORT]))
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


def test_reference_training_loss_of_a_single_target_token_is_its_cross_entropy() -> None:
    """The reference's training mean is over the batch's counted targets, however few: an empty caption (OPT's
    layout) leaves BOS as the only target, predicted from the last prefix slot, and the loss is that CE."""
    cap = tiny_captioner("opt")
    tok = cap.tokenizer
    assert tok.encode([""]) == [[]]
    prefix = cap.prefix(torch.randn(1, 16, generator=torch.Generator().manual_seed(0)))
    logits = cap.lm(inputs_embeds=prefix).logits[0, -1:]
    expected = F.cross_entropy(logits, torch.tensor([tok.bos_id]))
    forcing = teacher_forcing(tok, [""], reference_quirks=True, training=True)
    torch.testing.assert_close(caption_losses(cap, prefix, forcing).mean(), expected, rtol=1e-5, atol=1e-5)


# ---- CapDec's noise --------------------------------------------------------------------------------------------
def test_noise_is_normalize_of_normalized_input_plus_std_times_gaussian_draw() -> None:
    """``normalize(normalize(x) + sqrt(variance) * randn)``, the draw from the generator, else torch's global RNG."""
    x = 3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    draw = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    expected = F.normalize(F.normalize(x, dim=-1) + draw * CAPDEC_NOISE_VARIANCE**0.5, dim=-1)
    got = noisy_embedding(x, CAPDEC_NOISE_VARIANCE, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)  # no generator: the global RNG (seeded runs)
    torch.testing.assert_close(noisy_embedding(x, CAPDEC_NOISE_VARIANCE), expected, rtol=1e-5, atol=1e-6)


def _record_mapper_input(captioner) -> list[torch.Tensor]:
    """Make ``captioner.prefix`` record the embeddings it is given (what the mapper reads)."""
    seen: list[torch.Tensor] = []
    real = captioner.prefix

    def prefix(emb: torch.Tensor) -> torch.Tensor:
        seen.append(emb.detach().clone())
        return real(emb)

    captioner.prefix = prefix
    return seen


def test_capdec_trains_on_the_noisy_caption_embedding_from_the_global_rng_by_default(clip) -> None:
    capdec = _method(CapDec, CapDecOptions(prefix_length=4), clip)
    assert capdec.generator is None
    batch = capdec.tokenize([SHORT, LONG])
    seen = _record_mapper_input(capdec.captioner)
    torch.manual_seed(5)
    loss = capdec(_images(clip), batch)
    with torch.no_grad():
        emb = capdec.encode_text(batch["clip_tokens"])
    torch.manual_seed(5)
    noisy = noisy_embedding(emb, CAPDEC_NOISE_VARIANCE)
    torch.testing.assert_close(seen[0], noisy, rtol=1e-5, atol=1e-6)
    assert (noisy - emb).norm(dim=-1).min() > 0.1  # the noise is on
    cap = capdec.captioner
    torch.testing.assert_close(loss, caption_losses(cap, cap.prefix(noisy), batch["forcing"]).mean())


def test_clipcap_without_noise_feeds_the_raw_image_embedding_when_not_normalising(clip) -> None:
    """ClipCap's own weights read the raw CLIP embedding (normalize_input false): no noise, no normalisation."""
    m = _method(Captioning, CaptioningOptions(prefix_length=4), clip)
    m.captioner.normalize_input = False
    images = _images(clip)
    batch = m.tokenize([SHORT, LONG])
    emb = m.clip_embedding(images)
    assert (emb.norm(dim=-1) - 1).abs().min() > 0.1
    seen = _record_mapper_input(m.captioner)
    loss = m(images, batch)
    torch.testing.assert_close(seen[0], emb)
    cap = m.captioner
    torch.testing.assert_close(loss, caption_losses(cap, cap.prefix(emb), batch["forcing"]).mean())


# ---- which layout training uses ----------------------------------------------------------------------------------
def test_reference_quirks_option_trains_on_the_references_training_layout(clip) -> None:
    """``reference_loss_quirks``: tokenize gives the reference's *training* layout (zero pads ignored, one token-mean
    over the batch), not its test-time one (pads counted) nor the clean one."""
    m = _method(Captioning, CaptioningOptions(prefix_length=4, reference_loss_quirks=True), clip)
    images = _images(clip)
    tok = m.captioner.tokenizer
    prefix = m.captioner.prefix(m.clip_embedding(images))

    def loss_of(**layout) -> torch.Tensor:
        return caption_losses(m.captioner, prefix, teacher_forcing(tok, [SHORT, LONG], **layout)).mean()

    got = m(images, m.tokenize([SHORT, LONG]))
    torch.testing.assert_close(got, loss_of(reference_quirks=True, training=True), rtol=1e-5, atol=1e-6)
    for other in (loss_of(reference_quirks=True, training=False), loss_of()):
        assert (got - other).abs() > 1e-3


# ---- the captioner the options build -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_opt"))


@pytest.mark.parametrize(
    "mapper, prefix, clip_length, layers, heads, dtype, normalize",
    [("transformer", 4, 3, 2, 4, "fp32", True), ("mlp", 5, 40, 8, 8, "bf16", False)],
)
def test_options_build_the_captioner_they_describe(
    clip, lm_folder, mapper: str, prefix: int, clip_length: int, layers: int, heads: int, dtype: str, normalize: bool
) -> None:
    options = CaptioningOptions(lm=str(lm_folder), tokenizer="clip-bpe", mapper=mapper, prefix_length=prefix,
                                clip_length=clip_length, mapper_layers=layers, mapper_heads=heads, lm_dtype=dtype,
                                normalize_input=normalize)  # fmt: skip
    cap = Captioning(clip, options).captioner
    assert cap.tokenizer.name == "open_clip-bpe" and cap.embed_dim == 32
    assert next(cap.lm.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert cap.normalize_input is normalize and cap.prefix_length == prefix
    if mapper == "mlp":
        assert isinstance(cap.mapper, MLPMapper) and cap.mapper.net[0].in_features == clip.embed_dim
    else:
        assert isinstance(cap.mapper, TransformerMapper) and cap.mapper.project.in_features == clip.embed_dim
        assert (cap.mapper.clip_length, len(cap.mapper.blocks)) == (clip_length, layers)
        assert all(b.attn.heads == heads for b in cap.mapper.blocks)


# ---- mapper loaders ----------------------------------------------------------------------------------------------
def test_mapper_weights_option_loads_the_saved_mapper_and_refuses_another_shape(clip, tmp_path) -> None:
    source = tiny_captioner(clip_dim=clip.embed_dim, seed=3).mapper
    path = tmp_path / "mapper.safetensors"
    save_mapper_weights(source.state_dict(), {"kind": "transformer"}, path, {})
    m = _method(Captioning, CaptioningOptions(prefix_length=4, mapper_weights=str(path)), clip)
    for (name, want), got in zip(source.state_dict().items(), m.captioner.mapper.state_dict().values()):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.half().float(), msg=name)  # fp16 storage
    other = tmp_path / "mlp.safetensors"  # another mapper kind: none of the names match
    save_mapper_weights(tiny_captioner(clip_dim=clip.embed_dim, mapper="mlp").mapper.state_dict(), {}, other, {})
    with pytest.raises(ConfigError):
        _method(Captioning, CaptioningOptions(prefix_length=4, mapper_weights=str(other)), clip)


def test_load_mapper_reads_a_reference_checkpoint_and_refuses_another_shape(clip, tmp_path) -> None:
    source = tiny_captioner(clip_dim=clip.embed_dim, seed=3).mapper
    torch.save({"state_dict": mapper_state_to_reference(source.state_dict())}, tmp_path / "m.pt")
    m = _method(Captioning, CaptioningOptions(prefix_length=4), clip)
    m.load_mapper(str(tmp_path / "m.pt"))
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), m.captioner.mapper.parameters()))
    mlp = tiny_captioner(clip_dim=clip.embed_dim, mapper="mlp").mapper
    torch.save({"state_dict": mapper_state_to_reference(mlp.state_dict())}, tmp_path / "mlp.pt")
    with pytest.raises(ConfigError):
        m.load_mapper(str(tmp_path / "mlp.pt"))


# ---- CLIP text embeddings ----------------------------------------------------------------------------------------
def test_encode_text_tokenizes_strings_with_clips_tokenizer_and_normalises_each_row(clip) -> None:
    m = _method(CapDec, CapDecOptions(prefix_length=4), clip)
    texts = [SHORT, LONG, "a blue circle"]
    got = m.encode_text(texts)
    torch.testing.assert_close(got, m.encode_text(clip.tokenize(texts)))
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    raw = clip.encode_text(clip.tokenize(texts)).float()
    torch.testing.assert_close(got, raw / raw.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


# ---- decoding options --------------------------------------------------------------------------------------------
def _within(captions: list[str], max_new_tokens: int) -> bool:
    """Byte-level tokens: a caption of at most N tokens has at most N characters."""
    return all(len(c) <= max_new_tokens for c in captions)


def test_caption_honours_max_new_tokens_and_greedy_final_beams(clip) -> None:
    m = _method(Captioning, CaptioningOptions(prefix_length=4, max_new_tokens=3, final_beams=1), clip)
    images = _images(clip, 3)
    captions = m.caption(images)
    assert len(captions) == 3 and _within(captions, 3)
    assert _within(m.caption(images, beams=2), 3)


def test_rlcf_caption_needs_no_reward_to_caption_and_honours_the_decoding_options(clip) -> None:
    options = RLCFCaptionOptions(prefix_length=4, sample_k=3, max_new_tokens=3, final_beams=1,
                                 reward=["vlprompt-tiny", "vlprompt-small"], reward_pretrained=["none"])  # fmt: skip
    m = _method(RLCFCaption, options, clip)
    assert m.reward_specs() == reward_specs(options) == [("vlprompt-tiny", None), ("vlprompt-small", None)]
    image = _images(clip, 1)
    ep = m.begin(image)  # no reward attached: the unadapted captioner's episode
    assert ep.views is image and ep.extra["reward_image"] is None
    caption = m.predict(ep)
    assert isinstance(caption, str) and _within([caption], 3)
    with pytest.raises(RuntimeError):
        m.rewards(ep, ["a dog"])


def test_rlcf_caption_keeps_the_reward_features_it_is_given(clip) -> None:
    """The runner encodes a batch's reward images in one call and hands each episode its row: begin keeps it."""

    class Reward:
        calls = 0

        def image_features(self, *args):
            Reward.calls += 1
            return [torch.zeros(1, 4)]

    m = _method(RLCFCaption, RLCFCaptionOptions(prefix_length=4, sample_k=3), clip)
    m.attach_reward(Reward())
    given = [torch.ones(1, 4)]
    ep = m.begin(_images(clip, 1), given)
    assert ep.extra["reward_image"] is given and Reward.calls == 0
    ep = m.begin(_images(clip, 1))  # none given: computed from the image
    assert Reward.calls == 1 and torch.equal(ep.extra["reward_image"][0], torch.zeros(1, 4))
