"""The captioner: ClipCap's mappers (sizes, attention maths, checkpoint keys), tokenizers, the frozen LM, decoding."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone.captioner import (
    CaptionTokenizer,
    MapperConfig,
    build_mapper,
    load_causal_lm,
    load_mapper_checkpoint,
    mapper_config_from_state,
    mapper_state_from_reference,
    mapper_state_to_reference,
)
from vlprompt.errors import ConfigError, WeightsUnavailableError

from .caption_helpers import gpt2_tokenizer, opt_tokenizer, tiny_captioner


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- mappers -------------------------------------------------------------------------------------------------------
def test_rlcf_transformer_mapper_parameter_count_matches_the_formula() -> None:
    # RLCF: CLIP ViT-B/16 (512-d) -> OPT-125m (768-d), 8 layers, 8 heads, prefix 40, clip length 40, MLP ratio 2
    d, e, p, c, layers = 512, 768, 40, 40, 8
    with torch.device("meta"):
        mapper = build_mapper(MapperConfig("transformer", d, e, p, c, layers, 8))
    linear = d * c * e + c * e
    per_layer = 2 * e + e * e + 2 * e * e + (e * e + e) + 2 * e + (e * 2 * e + 2 * e) + (2 * e * e + e)
    assert per_layer == 8 * e * e + 8 * e
    assert _count(mapper) == linear + p * e + layers * per_layer  # 53.6M: 15.8M linear, 8 x 4.7M layers


def test_clipcap_mlp_mapper_parameter_count_matches_the_formula() -> None:
    d, e, p = 512, 768, 10  # ClipCap's MLP variant on GPT-2
    with torch.device("meta"):
        mapper = build_mapper(MapperConfig("mlp", d, e, p))
    hidden = e * p // 2
    assert _count(mapper) == d * hidden + hidden + hidden * e * p + e * p


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_mapper_output_shape(kind: str) -> None:
    mapper = build_mapper(MapperConfig(kind, 16, 32, 5, 3, 2, 4))
    assert mapper(torch.randn(3, 16)).shape == (3, 5, 32)


def test_mapper_attention_matches_clipcap_einsum_maths() -> None:
    """ClipCap's attention written from its definition: keys/values come from one projection whose output is read
    as (2, heads, head_dim), scores scaled by head_dim^-0.5, softmax over keys, then the output projection."""
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig("transformer", 8, 16, 4, 2, 1, 4))
    attn = mapper.blocks[0].attn
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    attn.double()
    b, n, c, h = 2, 6, 16, 4
    q = (x @ attn.q.weight.T).reshape(b, n, h, c // h)
    kv = (x @ attn.kv.weight.T).reshape(b, n, 2, h, c // h)
    scores = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (c // h) ** -0.5
    out = torch.einsum("bnmh,bmhd->bnhd", scores.softmax(dim=2), kv[:, :, 1]).reshape(b, n, c)
    expected = out @ attn.out.weight.T + attn.out.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_transformer_mapper_returns_the_constant_positions() -> None:
    """The prefix is the transformer's output at the learned constants, which come after the mapped CLIP tokens."""
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig("transformer", 8, 16, 4, 3, 1, 4))
    x = torch.randn(2, 8)
    tokens = mapper.project(x).view(2, 3, 16)
    h = mapper.blocks[0](torch.cat([tokens, mapper.const.expand(2, -1, -1)], dim=1))
    torch.testing.assert_close(mapper(x), h[:, 3:])


# ---- reference checkpoints -----------------------------------------------------------------------------------------
def _reference_keys(layers: int) -> set[str]:
    """ClipCap's TransformerMapper names (its train.py; the same in CapDec and RLCF) below ``clip_project.``."""
    keys = {"linear.weight", "linear.bias", "prefix_const"}
    for i in range(layers):
        t = f"transformer.layers.{i}."
        keys |= {t + "attn.to_queries.weight", t + "attn.to_keys_values.weight", t + "attn.project.weight",
                 t + "attn.project.bias", t + "mlp.fc1.weight", t + "mlp.fc1.bias", t + "mlp.fc2.weight",
                 t + "mlp.fc2.bias"}  # fmt: skip
        keys |= {t + f"norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
    return {"clip_project." + k for k in keys}


def test_reference_names_are_clipcaps_and_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig("transformer", 8, 16, 4, 3, 2, 4))
    ref = mapper_state_to_reference(mapper.state_dict())
    assert set(ref) == _reference_keys(2)
    assert ref["clip_project.transformer.layers.0.attn.to_keys_values.weight"].shape == (32, 16)  # no bias
    # an RLCF training checkpoint: {'state_dict': model.state_dict() with the LM, 'epoch', ...}
    lm_tensor = {"llm.llm.model.decoder.embed_tokens.weight": torch.zeros(5, 16)}
    torch.save({"epoch": 3, "state_dict": {**ref, **lm_tensor}}, tmp_path / "ckpt.pt")
    loaded = load_mapper_checkpoint(tmp_path / "ckpt.pt")
    assert set(loaded) == set(mapper.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in mapper.state_dict().items())
    fresh = build_mapper(mapper_config_from_state(loaded, 16, num_heads=4))
    fresh.load_state_dict(loaded, strict=True)
    x = torch.randn(2, 8)
    torch.testing.assert_close(fresh(x), mapper(x))


def test_mlp_reference_names_and_config_from_state() -> None:
    mapper = build_mapper(MapperConfig("mlp", 8, 16, 5))
    ref = mapper_state_to_reference(mapper.state_dict())
    assert set(ref) == {f"clip_project.model.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    # ClipCap's own checkpoints: a plain state dict with the GPT-2 tensors beside (module. from DataParallel)
    ours = mapper_state_from_reference(
        {"module." + k: v for k, v in ref.items()} | {"gpt.lm_head.weight": torch.ones(1)}
    )
    cfg = mapper_config_from_state(ours, embed_dim=16)
    assert (cfg.kind, cfg.clip_dim, cfg.prefix_length) == ("mlp", 8, 5)


def test_checkpoint_errors_are_clear(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_mapper_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="no mapper tensors"):
        mapper_state_from_reference({"gpt.wte.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="no counterpart"):
        mapper_state_from_reference({"clip_project.transformer.layers.0.cross.weight": torch.zeros(2)})


# ---- tokenizers ----------------------------------------------------------------------------------------------------
def test_transformers_tokenizers_eos_is_newline_and_bos_as_the_tokenizer_adds_it() -> None:
    opt, gpt2 = opt_tokenizer(), gpt2_tokenizer()
    assert (opt.bos_id, opt.pad_id) == (2, 1)  # OPT prepends </s> and pads with 1
    assert opt.decode_fn([opt.eos_id]) == "\n"
    assert gpt2.bos_id is None and gpt2.decode_fn([gpt2.eos_id]) == "\n"
    ids = opt.encode(["a dog"])[0]
    assert opt.decode(ids + [opt.eos_id] + opt.encode(["more"])[0]) == "a dog"  # cut at eos


def test_clip_bpe_tokenizer_uses_clips_start_and_end_tokens() -> None:
    tok = CaptionTokenizer.clip_bpe()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (49406, 49407, 49408)
    assert tok.decode([tok.bos_id] + tok.encode(["A red square"])[0] + [tok.eos_id, 320]) == "a red square"


def test_missing_lm_is_weights_unavailable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the network in tests
    with pytest.raises(WeightsUnavailableError, match="huggingface-cli download"):
        load_causal_lm("no-such-org/no-such-lm")


# ---- the captioner -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_frozen_lm_gets_no_gradient_and_stays_in_eval(kind: str) -> None:
    cap = tiny_captioner(kind)
    cap.train()
    assert not cap.lm.training and cap.mapper.training
    prefix = cap.prefix(torch.randn(2, 16))
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    cap.logits(prefix, ids, torch.ones_like(ids), keep=3).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in cap.lm.parameters())
    assert all(p.grad is not None for p in cap.mapper.parameters())


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_logits_keep_the_last_positions_of_the_full_forward(kind: str) -> None:
    cap = tiny_captioner(kind)
    prefix = cap.prefix(torch.randn(2, 16))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    embeds = torch.cat([prefix, cap.lm.get_input_embeddings()(ids)], dim=1)
    full = cap.lm(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1)).logits
    torch.testing.assert_close(cap.logits(prefix, ids, mask, keep=5), full[:, -5:], rtol=1e-5, atol=1e-5)


def test_prefix_normalises_the_clip_embedding_unless_told_not_to() -> None:
    cap = tiny_captioner()
    x = torch.randn(2, 16)
    torch.testing.assert_close(cap.prefix(3 * x), cap.prefix(x))
    cap.normalize_input = False  # ClipCap's own checkpoints were trained on raw embeddings
    assert not torch.allclose(cap.prefix(3 * x), cap.prefix(x))


def _eos_dominant(cap) -> None:
    """Make the LM end captions early: the final norm's bias points at eos's (tied, enlarged) output row."""
    w = cap.lm.get_input_embeddings().weight
    with torch.no_grad():
        w[cap.tokenizer.eos_id] *= 1.0 / w[cap.tokenizer.eos_id].norm()
        cap.lm.model.decoder.final_layer_norm.bias.copy_(20 * w[cap.tokenizer.eos_id])


def test_beam_search_returns_k_captions_per_image_ending_at_eos() -> None:
    cap = tiny_captioner()
    _eos_dominant(cap)
    prefix = cap.prefix(torch.randn(2, 16))
    ids = cap.beam_search(prefix, num_beams=3, num_return=3, max_new_tokens=10)
    assert ids.shape[0] == 6
    eos = cap.tokenizer.eos_id
    assert all(eos in row for row in ids.tolist())
    captions = cap.generate(prefix, 3, 3, max_new_tokens=10)
    assert [len(c) for c in captions] == [3, 3]
    assert len(set(captions[0])) == 3  # K distinct beams
    flat = [c for per_image in captions for c in per_image]
    expected = [cap.tokenizer.decode(row[: row.index(eos)]) for row in ids.tolist()]
    assert flat == expected and not any("\n" in c for c in flat)


def test_beam_search_stops_at_max_new_tokens_for_a_batch_of_images() -> None:
    cap = tiny_captioner()
    ids = cap.beam_search(cap.prefix(torch.randn(3, 16)), num_beams=2, num_return=1, max_new_tokens=6)
    assert ids.shape[0] == 3 and ids.shape[1] <= 6


def test_tokenizer_larger_than_the_lm_is_refused() -> None:
    from vlprompt.backbone.captioner import Captioner

    cap = tiny_captioner()
    with pytest.raises(ConfigError, match="rows"):
        Captioner(cap.mapper, cap.lm, CaptionTokenizer.clip_bpe())


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
@pytest.mark.parametrize("keep", [3, 6, 7])  # fewer than the captions' length, all of it, and from the prefix's end
def test_one_prefix_for_many_captions_is_read_once_with_the_same_logits_and_gradient(kind, keep):
    cap = tiny_captioner(kind)
    torch.manual_seed(4)
    embed = torch.randn(1, 16)
    ids = torch.randint(4, 200, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids = ids.masked_fill(mask == 0, cap.tokenizer.pad_id)
    weights = torch.randn(3, keep, 1)  # any loss on the kept logits

    def run(shared: bool):
        cap.zero_grad(set_to_none=True)
        prefix = cap.prefix(embed)
        calls: list[int] = []
        hook = cap.lm.register_forward_pre_hook(lambda m, a, k: calls.append(k["inputs_embeds"].shape[0]),
                                                with_kwargs=True)  # fmt: skip
        try:
            logits = cap.logits(prefix if shared else prefix.expand(3, -1, -1), ids, mask, keep)
        finally:
            hook.remove()
        (logits * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in cap.mapper.parameters()], calls

    shared, g_shared, calls_shared = run(True)
    repeated, g_repeated, calls_repeated = run(False)
    assert calls_shared == [1, 3] and calls_repeated == [3]  # the prefix went through the LM once, alone
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_shared, g_repeated):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
