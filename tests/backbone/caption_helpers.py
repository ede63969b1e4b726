"""Tiny captioners for tests: random OPT / GPT-2 configs and byte-level tokenizers built here, nothing downloaded."""

from __future__ import annotations

import torch
from open_clip.tokenizer import bytes_to_unicode
from transformers import GPT2Config, GPT2Tokenizer, OPTConfig, OPTForCausalLM

from vlprompt.backbone.captioner import Captioner, CaptionTokenizer, MapperConfig, build_mapper


def opt_tokenizer() -> CaptionTokenizer:
    """OPT's layout on a byte-level vocabulary: <s>=0, <pad>=1, </s>=2 (prepended as BOS), <unk>=3."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in bytes_to_unicode().values():
        vocab[c] = len(vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                        pad_token="<pad>", add_bos_token=True)  # fmt: skip
    return CaptionTokenizer.from_transformers(tok)


def gpt2_tokenizer() -> CaptionTokenizer:
    """GPT-2's layout: bytes, then <|endoftext|>; no BOS added, no pad token."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    return CaptionTokenizer.from_transformers(GPT2Tokenizer(vocab=vocab, merges=[]))


def tiny_lm(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer OPT or GPT-2 of width 32."""
    torch.manual_seed(seed)
    if kind == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                        eos_token_id=2)  # fmt: skip
        return OPTForCausalLM(cfg)
    from transformers import GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=vocab - 1,
                     eos_token_id=vocab - 1)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def tiny_captioner(
    kind: str = "opt",
    mapper: str = "transformer",
    clip_dim: int = 16,
    prefix: int = 4,
    seed: int = 0,
    clip_bpe: bool = False,
) -> Captioner:
    """A captioner with a 2-layer mapper (clip length 3) in front of a tiny random LM; byte-level tokenizers, or
    open_clip's BPE (whole words, which a reward CLIP tells apart; random bytes often decode to the same junk)."""
    if clip_bpe:
        tok = CaptionTokenizer.clip_bpe()
    else:
        tok = opt_tokenizer() if kind == "opt" else gpt2_tokenizer()
    lm = tiny_lm(kind, tok.vocab_size, seed)
    torch.manual_seed(seed + 1)
    mapper_module = build_mapper(MapperConfig(mapper, clip_dim, 32, prefix, 3, 2, 4))
    return Captioner(mapper_module, lm, tok)
