"""The embedded models' restricted vocabulary: text they cannot read is reported once, loudly, never silently."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

import vlprompt
from vlprompt.backbone.embedded import UNKNOWN_SHARE_WARNING, VocabularyWatch, known_token_rows
from vlprompt.runners.pretrain import world_texts

# Captions a user brought (clip art and emoji titles): almost none of their words are the world's.
REAL_CAPTIONS = [
    "a smiling face with heart-shaped eyes",
    "grinning squinting face, drawn in monochrome",
    "a cartoon pineapple wearing sunglasses on the beach",
    "hand-drawn clip art of a vintage bicycle",
    "thumbs up sign in yellow",
]


@pytest.fixture(scope="module")
def world_model() -> vlprompt.Backbone:
    return vlprompt.load_backbone("vlprompt-tiny", pretrained="world")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vlprompt.backbone" and r.levelno == logging.WARNING]


def test_only_a_sparse_token_table_is_watched(world_model: vlprompt.Backbone) -> None:
    known = known_token_rows(world_model.model)
    assert known is not None and 0 < int(known.sum()) < 1000 and known.numel() == 49408
    assert isinstance(world_model.tokenizer, VocabularyWatch)
    full = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)  # random init: every row is a vector
    assert known_token_rows(full.model) is None and not isinstance(full.tokenizer, VocabularyWatch)


def test_real_captions_warn_once_with_the_share_and_the_remedy(
    world_model: vlprompt.Backbone, caplog: pytest.LogCaptureFixture
) -> None:
    watch = copy.deepcopy(world_model.tokenizer)  # a fresh tally; the copy still forwards the tokenizer's methods
    assert watch.decode(watch([REAL_CAPTIONS[0]])[0].tolist()).startswith("<start_of_text>a smiling")
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone"):
        watch(REAL_CAPTIONS)
        watch(REAL_CAPTIONS)
    records = _warnings(caplog)
    assert len(records) == 1
    share = watch.unknown / watch.seen
    assert share > 0.5  # measured: over half of these captions' tokens have no row
    message = records[0].getMessage()
    assert f"{100 * share:.0f}% of the" in message and "open_clip model with real weights" in message
    assert "'smiling'" in message or "'pineapple'" in message  # examples of what it cannot read


def test_world_captions_do_not_warn(small_world: Path, caplog: pytest.LogCaptureFixture) -> None:
    backbone = vlprompt.load_backbone("vlprompt-tiny", pretrained="world")
    classes = json.loads((small_world / "classification" / "classes.json").read_text())["names"]
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone"):
        backbone.tokenize(world_texts(small_world))
        backbone.tokenize([f"a photo of a {c}." for c in classes])
    assert backbone.tokenizer.seen > 1000 and backbone.tokenizer.unknown == 0 and not _warnings(caplog)


class _Ids:
    """A stand-in tokenizer: each text is already its token ids (0 = padding, 9 = start/end)."""

    all_special_ids = [9]

    def __call__(self, texts: list[list[int]]) -> torch.Tensor:
        return torch.tensor(texts)


def test_the_threshold_is_a_share_of_counted_tokens(caplog: pytest.LogCaptureFixture) -> None:
    known = torch.zeros(10, dtype=torch.bool)
    known[1:6] = True  # ids 1-5 have rows, 6-8 do not
    watch = VocabularyWatch(_Ids(), known, "toy", UNKNOWN_SHARE_WARNING)
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone"):
        watch([[9, 1, 2, 3, 4, 6, 9, 0, 0]])  # 1 of 5 counted tokens unknown: exactly 20%, no warning
        assert (watch.seen, watch.unknown) == (5, 1) and not _warnings(caplog)
        watch([[9, 1, 2, 3, 4, 7, 9, 0, 0]])  # 2 of 10: still 20%
        assert not _warnings(caplog)
        watch([[9, 8, 9, 0, 0, 0, 0, 0, 0]])  # 3 of 11: above
    assert len(_warnings(caplog)) == 1 and "27% of the 11 text tokens" in _warnings(caplog)[0].getMessage()
