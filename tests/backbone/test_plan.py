"""PromptPlan bookkeeping and the token-writing helpers the towers are built on."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone.plan import (
    PromptPlan,
    batched,
    insert_tokens,
    insert_tokens_at,
    replace_tokens_at,
    write_tokens,
)


def test_empty_plan_properties():
    plan = PromptPlan()
    assert plan.is_empty()
    assert plan.num_inserted == 0
    assert plan.max_layer() == -1


@pytest.mark.parametrize(
    ("kwargs", "max_layer"),
    [
        ({"insert": torch.zeros(3, 4)}, 0),
        ({"replace": {2: torch.zeros(1, 4)}}, 2),
        ({"add": {5: torch.zeros(1, 4)}}, 5),
        ({"prefix": {7: (torch.zeros(1, 4), torch.zeros(1, 4))}}, 7),
        ({"insert": torch.zeros(3, 4), "replace": {1: torch.zeros(3, 4), 4: torch.zeros(3, 4)}}, 4),
    ],
)
def test_non_empty_plans_report_their_deepest_layer(kwargs, max_layer):
    plan = PromptPlan(**kwargs)
    assert not plan.is_empty()
    assert plan.max_layer() == max_layer


def test_mask_only_plan_is_not_empty():
    plan = PromptPlan(attn_mask=torch.ones(3, 3, dtype=torch.bool))
    assert not plan.is_empty()
    assert plan.max_layer() == -1


def test_num_inserted_counts_tokens_for_shared_and_per_sample():
    assert PromptPlan(insert=torch.zeros(5, 8)).num_inserted == 5
    assert PromptPlan(insert=torch.zeros(2, 3, 8)).num_inserted == 3


def test_batched_broadcasts_shared_and_checks_batch():
    tokens = torch.randn(3, 4)
    out = batched(tokens, 5)
    assert out.shape == (5, 3, 4)
    assert torch.equal(out[4], tokens)
    assert batched(tokens[None], 2).shape == (2, 3, 4)
    per_sample = torch.randn(2, 3, 4)
    assert batched(per_sample, 2) is not None and torch.equal(batched(per_sample, 2), per_sample)
    with pytest.raises(ValueError, match="batch 3"):
        batched(torch.randn(3, 3, 4), 2)


def test_write_tokens_replace_and_add():
    x = torch.randn(2, 6, 4)
    original = x.clone()
    tokens = torch.randn(2, 4)
    replaced = write_tokens(x, tokens, 1, "replace")
    expected = x.clone()
    expected[:, 1:3] = tokens
    assert torch.equal(replaced, expected)
    added = write_tokens(x, tokens, 2, "add")
    expected = x.clone()
    expected[:, 2:4] += tokens
    torch.testing.assert_close(added, expected)
    assert torch.equal(x, original), "the caller's tensor must not be mutated"


def test_write_tokens_per_sample():
    x = torch.zeros(2, 4, 3)
    tokens = torch.arange(12.0).reshape(2, 2, 3)
    out = write_tokens(x, tokens, 2, "replace")
    assert torch.equal(out[:, 2:], tokens)
    assert torch.equal(out[:, :2], torch.zeros(2, 2, 3))


def test_write_tokens_span_past_the_end_raises():
    x = torch.zeros(1, 5, 3)
    write_tokens(x, torch.zeros(4, 3), 1, "replace")  # exactly fits
    with pytest.raises(ValueError, match="exceeds sequence length 5"):
        write_tokens(x, torch.zeros(5, 3), 1, "replace")


def test_insert_tokens_places_tokens_at_start():
    x = torch.arange(2 * 3 * 2.0).reshape(2, 3, 2)
    tokens = torch.full((2, 2), -1.0)
    out = insert_tokens(x, tokens, 1)
    assert out.shape == (2, 5, 2)
    assert torch.equal(out[:, :1], x[:, :1])
    assert torch.equal(out[:, 1:3], tokens.expand(2, 2, 2))
    assert torch.equal(out[:, 3:], x[:, 1:])


def test_helpers_cast_tokens_to_the_sequence_dtype():
    x = torch.zeros(1, 4, 2, dtype=torch.float64)
    assert write_tokens(x, torch.ones(1, 2), 1, "add").dtype == torch.float64
    assert insert_tokens(x, torch.ones(1, 2), 1).dtype == torch.float64


def test_per_row_span_helpers_cast_tokens_to_the_sequence_dtype():
    """Suffix tokens (float64 here) take the hidden states' dtype; ``torch.where`` alone would promote to float64."""
    x = torch.zeros(2, 4, 3, dtype=torch.float32)
    tokens = torch.ones(2, 3, dtype=torch.float64)
    starts = torch.tensor([1, 2])
    assert insert_tokens_at(x, tokens, starts).dtype == torch.float32
    assert replace_tokens_at(x, tokens, starts).dtype == torch.float32


def test_span_helpers_cast_wider_tokens_down_to_the_sequence_dtype():
    """float64 tokens in a float32 sequence stay float32 (``torch.cat`` alone would promote to float64)."""
    x = torch.zeros(1, 4, 2, dtype=torch.float32)
    tokens = torch.ones(1, 2, dtype=torch.float64)
    assert write_tokens(x, tokens, 1, "replace").dtype == torch.float32
    assert write_tokens(x, tokens, 1, "add").dtype == torch.float32
    assert insert_tokens(x, tokens, 1).dtype == torch.float32


def test_batched_tiles_per_frame_tokens_video_major():
    """Per-frame tokens ``[T, n, D]`` for frames flattened as ``B*T`` (video-major): row ``b*T + t`` gets frame t's."""
    tokens = torch.randn(2, 1, 3)  # T = 2 frames, one token each
    out = batched(tokens, 6)  # B = 3 videos
    assert out.shape == (6, 1, 3)
    for b in range(3):
        for t in range(2):
            assert torch.equal(out[b * 2 + t], tokens[t])
    with pytest.raises(ValueError, match="batch 4"):
        batched(torch.randn(4, 2, 3), 6)
