"""vlprompt's beam search returns exactly the ids of transformers' ``generate`` (tiny random OPT / GPT-2)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from vlprompt.backbone.beam_search import beam_search, generation_overrides  # noqa: E402
from vlprompt.errors import ConfigError  # noqa: E402

from .caption_helpers import tiny_captioner  # noqa: E402


def sharpen(cap, eos_near_top: bool = False, scale: float = 30.0):
    """Widen the tiny LM's logits (its random head gives near-uniform ones, whose near-ties float rounding of a
    different batch layout could flip) by scaling the final norm; optionally raise eos's logit by a bias that puts
    it just under the best token of a probe prefix's first step, so captions often end early but not all at once."""
    lm = cap.lm
    norm = lm.model.decoder.final_layer_norm if hasattr(lm, "model") else lm.transformer.ln_f
    with torch.no_grad():
        norm.weight.mul_(scale)
    if eos_near_top:
        eos = cap.tokenizer.eos_id
        probe = cap.prefix(torch.randn(4, 16, generator=torch.Generator().manual_seed(99)))
        lead = cap._lead(4, probe.device)
        with torch.no_grad():
            logits = lm(inputs_embeds=probe if lead is None else torch.cat([probe, lead], 1)).logits[:, -1]
        bias = torch.zeros(logits.shape[-1])
        bias[eos] = float((logits.max(-1).values - logits[:, eos]).mean()) - 0.5
        lm.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    return cap


def random_prefix(cap, b: int, gen: torch.Generator) -> torch.Tensor:
    """``b`` prefixes: half the mapper's output for random CLIP embeddings, half raw unit-variance embeddings (the
    tiny random mapper's outputs differ little, raw ones lead the LM to captions of varied lengths)."""
    mapped = cap.prefix(torch.randn(b, 16, generator=gen))
    raw = torch.randn(mapped.shape, generator=gen)
    return torch.cat([mapped[: b // 2], raw[b // 2 :]])


def both(cap, prefix, k, r, n, lp):
    """(ours, transformers') ids for the same call."""
    cap.beam_impl = "vlprompt"
    ours = cap.beam_search(prefix, k, r, n, lp)
    cap.beam_impl = "transformers"
    theirs = cap.beam_search(prefix, k, r, n, lp)
    cap.beam_impl = "vlprompt"
    return ours, theirs


CASES = [  # K, num_return, max_new_tokens, length_penalty and batch cycle through every combination's neighbours
    (k, r, n, lp, b)
    for i, (k, r, n) in enumerate(itertools.product((1, 2, 5, 10), ("one", "all"), (1, 5, 20)))
    for lp, b in [((1.0, 0.0, 2.0)[i % 3], (1, 3)[i % 2]), ((2.0, 1.0, 0.0)[i % 3], (3, 1)[i % 2])]
]


@pytest.mark.parametrize("kind,clip_bpe", [("opt", False), ("gpt2", False), ("opt", True), ("gpt2", True)])
def test_same_ids_as_generate(kind, clip_bpe):
    cap = sharpen(tiny_captioner(kind, seed=3, clip_bpe=clip_bpe))
    gen = torch.Generator().manual_seed(11)
    for k, r, n, lp, b in CASES[:: 2 if clip_bpe else 1]:  # half the cases on the 49k-token vocabulary
        r = 1 if r == "one" else k
        prefix = random_prefix(cap, b, gen)
        ours, theirs = both(cap, prefix, k, r, n, lp)
        assert ours.shape[0] == b * r
        assert torch.equal(ours, theirs), (k, r, n, lp, b)


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_ids_when_eos_comes_early(kind, seed):
    """eos likely at every step: beams finish at different lengths, the pool fills, the early stop fires and rows
    are filled after eos (OPT's pad 1, GPT-2's pad = eos)."""
    cap = sharpen(tiny_captioner(kind, seed=seed), eos_near_top=True)
    eos = cap.tokenizer.eos_id
    gen = torch.Generator().manual_seed(100 + seed)
    saw_short = False
    for k, r, lp in [(2, 2, 1.0), (5, 1, 0.0), (5, 5, 2.0), (10, 10, 1.0), (10, 3, 0.0), (1, 1, 1.0)]:
        prefix = random_prefix(cap, 3, gen)
        ours, theirs = both(cap, prefix, k, r, 20, lp)
        assert torch.equal(ours, theirs), (k, r, lp)
        saw_short |= bool((ours[:, :-1] == eos).any()) or ours.shape[1] < 20
    assert saw_short  # the bias does make captions end before max_new_tokens


def test_pad_zero_fills_with_eos_and_greedy_fills_with_pad():
    """open_clip's BPE has pad 0: transformers' beam rows are then filled with eos, greedy rows with pad 0."""
    cap = sharpen(tiny_captioner("opt", seed=5, clip_bpe=True), eos_near_top=True)
    assert cap.tokenizer.pad_id == 0
    eos = cap.tokenizer.eos_id
    prefix = random_prefix(cap, 4, torch.Generator().manual_seed(5))
    for k in (1, 5):
        ours, theirs = both(cap, prefix, k, k, 20, 1.0)
        assert torch.equal(ours, theirs)
        ended = [row[row.tolist().index(eos) + 1 :] for row in ours if eos in row.tolist()[:-1]]
        assert ended, "no caption ended before the last column"
        fill = 0 if k == 1 else eos
        assert all(bool((tail == fill).all()) for tail in ended)


def test_prefix_read_once_per_image():
    """The LM reads the prefix with batch B (not B*K) and every later call feeds one token per beam."""
    cap = sharpen(tiny_captioner("opt", seed=1))
    seen = []
    hook = cap.lm.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            tuple(kwargs["inputs_embeds"].shape[:2]) if kwargs.get("inputs_embeds") is not None
            else tuple(kwargs["input_ids"].shape)
        ),
        with_kwargs=True,
    )  # fmt: skip
    prefix = cap.prefix(torch.randn(2, 16))
    cap.beam_search(prefix, 4, 4, 6)
    hook.remove()
    p = cap.prefix_length + 1  # prefix ; BOS
    assert seen[0] == (2, p)
    assert seen[1:] and all(shape == (8, 1) for shape in seen[1:])


def test_function_without_lead_matches_generate():
    """Direct call, no lead token (GPT-2 has no BOS): generate from the prefix alone."""
    cap = sharpen(tiny_captioner("gpt2", seed=2))
    assert cap.tokenizer.bos_id is None
    prefix = cap.prefix(torch.randn(2, 16))
    ours = beam_search(cap.lm, prefix, None, 3, 2, 8, 1.0, cap.tokenizer.eos_id, cap.tokenizer.pad_id)
    cap.beam_impl = "transformers"
    assert torch.equal(ours, cap.beam_search(prefix, 3, 2, 8, 1.0))


def test_lm_generation_settings_fall_back_to_generate(monkeypatch):
    """An LM whose own generation config adds a logits processor is decoded by generate itself."""
    cap = tiny_captioner("opt")
    assert generation_overrides(cap.lm) == []
    cap.lm.generation_config.min_length = 3
    cap.lm.generation_config.suppress_tokens = [5]
    assert generation_overrides(cap.lm) == ["min_length", "suppress_tokens"]
    calls = []
    original = cap.lm.generate
    monkeypatch.setattr(cap.lm, "generate", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    cap.beam_search(cap.prefix(torch.randn(1, 16)), 2, 1, 4)
    assert calls == [1]


def test_bad_arguments():
    cap = tiny_captioner("opt")
    prefix = cap.prefix(torch.randn(1, 16))
    with pytest.raises(ConfigError, match="num_return <= num_beams"):
        cap.beam_search(prefix, 2, 3, 4)
    with pytest.raises(ConfigError, match="max_new_tokens >= 1"):
        cap.beam_search(prefix, 2, 1, 0)
    cap.beam_impl = "hf"
    with pytest.raises(ConfigError, match="beam_impl"):
        cap.beam_search(prefix, 2, 1, 4)
