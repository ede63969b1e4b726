"""The world captioner's compact storage: a compact-vocabulary LM over open_clip's BPE, mappers, names, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vlprompt.backbone.captioner import (
    Captioner,
    CaptionTokenizer,
    MapperConfig,
    build_mapper,
    load_causal_lm,
    load_tokenizer,
)
from vlprompt.backbone.embedded_captioner import (
    WORLD_MAPPERS,
    is_world_lm,
    load_mapper_weights,
    load_world_lm,
    save_mapper_weights,
    save_world_lm,
    world_lm_config,
)
from vlprompt.errors import ConfigError, WeightsUnavailableError

TEXTS = ["a large red star left of a small blue circle", "two green squares", "a striped orange heart"]


def vocabulary(texts: list[str]) -> list[int]:
    bpe = CaptionTokenizer.clip_bpe()
    return sorted({i for row in bpe.encode(texts) for i in row} | {bpe.bos_id, bpe.eos_id})


def tiny_world_lm(vocab: list[int], seed: int = 0) -> torch.nn.Module:
    tok = CaptionTokenizer.clip_bpe(vocab)
    torch.manual_seed(seed)
    return load_causal_lm(world_lm_config(len(vocab), tok.bos_id, tok.eos_id, width=32, layers=2, heads=4)).eval()


def test_compact_tokenizer_maps_rows_to_bpe_and_back() -> None:
    vocab = vocabulary(TEXTS)
    full, compact = CaptionTokenizer.clip_bpe(), CaptionTokenizer.clip_bpe(vocab)
    assert compact.vocab_size == len(vocab) < 40 and compact.pad_id == compact.eos_id
    assert vocab[compact.bos_id] == full.bos_id and vocab[compact.eos_id] == full.eos_id
    rows = compact.encode(TEXTS)
    assert all(0 <= r < len(vocab) for row in rows for r in row)
    assert [[vocab[r] for r in row] for row in rows] == full.encode(TEXTS)  # the same BPE tokens, as rows
    assert [compact.decode(row + [compact.eos_id, 5]) for row in rows] == TEXTS  # decoding stops at eos


def test_compact_tokenizer_drops_unknown_tokens_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    compact = CaptionTokenizer.clip_bpe(vocabulary(TEXTS))
    with caplog.at_level(logging.WARNING, "vlprompt.backbone"):
        rows = compact.encode(["a red zebra", "a blue zebra"])
    assert compact.decode(rows[0]) == "a red" and compact.decode(rows[1]) == "a blue"
    assert len([r for r in caplog.records if "no row" in r.message and "zebra" in r.message]) == 1
    with pytest.raises(ConfigError, match="start- and end-of-text"):
        CaptionTokenizer.clip_bpe(vocabulary(TEXTS)[:-1])


def test_world_lm_round_trips_through_its_compact_file(tmp_path: Path) -> None:
    vocab = vocabulary(TEXTS)
    lm = tiny_world_lm(vocab)
    path = tmp_path / "lm.safetensors"
    save_world_lm(lm, vocab, path, {"note": "test"})
    assert is_world_lm(path) and not is_world_lm(tmp_path / "other.safetensors") and not is_world_lm(lm)
    loaded, stored_vocab = load_world_lm(path)
    assert stored_vocab == vocab
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # tied, stored once
    ids = torch.tensor([[1, 4, 2, 7]])
    want = lm.half().float()(input_ids=ids).logits  # fp16 storage: the same as the model rounded to fp16
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    # the named loaders resolve the file: the LM, and its tokenizer through the compact vocabulary
    assert isinstance(load_causal_lm(str(path)), type(lm))
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == len(vocab) and tok.decode(tok.encode(TEXTS[:1])[0]) == TEXTS[0]


def test_no_token_outside_the_vocabulary_is_ever_generated(tmp_path: Path) -> None:
    """The LM scores only its rows, so beam search can only write tokens of the kept vocabulary, whatever the
    prefix; a full-vocabulary tokenizer does not fit it."""
    vocab = vocabulary(TEXTS)
    save_world_lm(tiny_world_lm(vocab), vocab, tmp_path / "lm.safetensors", {})
    lm, tok = load_causal_lm(str(tmp_path / "lm.safetensors")), load_tokenizer(str(tmp_path / "lm.safetensors"))
    assert lm.get_output_embeddings().weight.shape[0] == len(vocab)
    torch.manual_seed(0)
    captioner = Captioner(build_mapper(MapperConfig("transformer", 16, 32, 4, 3, 1, 4)), lm, tok)
    prefix = captioner.prefix(torch.randn(3, 16)) * 20  # large random prefixes: anything the LM can write
    ids = captioner.beam_search(prefix, num_beams=4, num_return=4, max_new_tokens=12)
    assert ids.max() < len(vocab)
    allowed = set(vocab)
    full = CaptionTokenizer.clip_bpe()
    for row in ids.tolist():
        assert set(full.encode([tok.decode(row)])[0]) <= allowed  # the text re-reads into known tokens only
    with pytest.raises(ConfigError, match="tokens, the LM only"):
        Captioner(build_mapper(MapperConfig("transformer", 16, 32, 4, 3, 1, 4)), lm, full)


def test_mapper_weights_round_trip_and_clear_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig("transformer", 16, 32, 4, 3, 1, 4))
    path = tmp_path / "mapper.safetensors"
    save_mapper_weights(mapper.state_dict(), {"prefix_length": 4}, path, {})
    state, shape = load_mapper_weights(path)
    assert shape == {"prefix_length": 4}
    for k, v in mapper.state_dict().items():
        assert state[k].dtype == torch.float16
        torch.testing.assert_close(state[k].float(), v, atol=1e-3, rtol=1e-3)
    save_world_lm(tiny_world_lm(vocabulary(TEXTS)), vocabulary(TEXTS), tmp_path / "lm.safetensors", {})
    with pytest.raises(ConfigError, match="not a world mapper file"):
        load_mapper_weights(tmp_path / "lm.safetensors")
    with pytest.raises(ConfigError, match="not a world LM file"):
        load_world_lm(path)
    with pytest.raises(WeightsUnavailableError, match="no mapper weights"):
        load_mapper_weights(tmp_path / "missing.safetensors")


def test_missing_shipped_assets_name_the_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import vlprompt.backbone.embedded_captioner as ec

    monkeypatch.setattr(ec, "embedded_weights_path", lambda name: tmp_path / f"{name}.safetensors")
    with pytest.raises(WeightsUnavailableError, match="vlprompt.runners.world_captioner"):
        load_world_lm("vlprompt-world-lm")
    with pytest.raises(WeightsUnavailableError, match=WORLD_MAPPERS[0]):
        load_mapper_weights(WORLD_MAPPERS[0])
