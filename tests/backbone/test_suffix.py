"""Suffix prompts: tokens placed right before each caption's end-of-text token (DGL's effective postfix)."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone.plan import insert_tokens_at, replace_tokens_at
from vlprompt.backbone.towers import causal_mask


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def manual_suffix(tiny, tokens: torch.Tensor, layers: dict[int, torch.Tensor]) -> torch.Tensor:
    """Reference: row by row, splice the suffix before end-of-text and replace it before later blocks."""
    text = tiny.text
    outs = []
    for row in tokens:
        eot = int(row.argmax())
        x = text.token_embedding(row[None]) + text.src.positional_embedding[: row.shape[0]]
        x = torch.cat([x[:, :eot], layers[0][None], x[:, eot:]], dim=1)
        n = layers[0].shape[0]
        for layer, block in enumerate(text.blocks):
            if layer > 0 and layer in layers:
                x = torch.cat([x[:, :eot], layers[layer][None], x[:, eot + n :]], dim=1)
            x = block(x, attn_mask=causal_mask(x.shape[1], x.device, x.dtype))
        x = text.src.ln_final(x)
        outs.append(x[0, eot + n] @ text.src.text_projection)
    return torch.stack(outs)


@pytest.mark.parametrize("deeper", [(2,), (1, 3)])
def test_suffix_matches_manual_splice(tiny, deeper) -> None:
    tokens = tiny.tokenize(["a red star", "a small blue circle left of a large green square"])
    layers = {layer: torch.randn(3, tiny.text_width) for layer in (0, *deeper)}
    with torch.no_grad():
        ours = tiny.encode_text(tokens, PromptPlan(suffix=layers))
        reference = manual_suffix(tiny, tokens, layers)
        plain = tiny.encode_text(tokens)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # unlike tokens after end-of-text, they matter


def test_suffix_with_prefix_insert(tiny) -> None:
    tokens = tiny.tokenize(["a red star", "two purple hearts"])
    plan = PromptPlan(insert=torch.randn(2, tiny.text_width), suffix={0: torch.randn(2, tiny.text_width)})
    with torch.no_grad():
        batch = tiny.encode_text(tokens, plan)
        single = tiny.encode_text(tokens[1:], plan)
    assert torch.allclose(batch[1:], single, atol=1e-5)


def test_span_helpers() -> None:
    x = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1)
    out = insert_tokens_at(x, torch.full((2, 1), -1.0), torch.tensor([1, 3]))
    assert out[..., 0].tolist() == [[0, -1, -1, 1, 2, 3, 4], [5, 6, 7, -1, -1, 8, 9]]
    out = replace_tokens_at(out, torch.full((2, 1), -2.0), torch.tensor([1, 3]))
    assert out[..., 0].tolist() == [[0, -2, -2, 1, 2, 3, 4], [5, 6, 7, -2, -2, 8, 9]]


def test_suffix_must_start_at_layer_zero(tiny) -> None:
    with pytest.raises(ValueError, match="layer 0"):
        tiny.encode_text(tiny.tokenize(["a"]), PromptPlan(suffix={1: torch.randn(2, tiny.text_width)}))
