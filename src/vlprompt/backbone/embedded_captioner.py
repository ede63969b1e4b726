"""Compact storage of the embedded world's captioner: a tiny OPT language model and ClipCap / CapDec mappers.

The world LM (``vlprompt-world-lm``) reads open_clip's bundled BPE (no tokenizer files, no download), but only the
few hundred BPE tokens of the world's base training captions. It is built with a **compact vocabulary**: its token
table (tied to its output layer, as OPT's is) has one row per kept BPE token, and the file stores the kept BPE ids
in order (``vocabulary``: row ``i`` is BPE id ``vocabulary[i]``). The tokenizer maps BPE ids to rows and back
(:meth:`vlprompt.backbone.captioner.CaptionTokenizer.clip_bpe`), so a token the world never used has no row at all
and can never be generated, and each decoding step scores a few hundred tokens instead of 49,408. (The other
option, a full 49,408-row table with a ``-inf`` logit bias on absent rows, stores and computes rows no caption can
use.) BOS / eos are CLIP's start / end-of-text tokens; the pad id is eos (pads are always masked).

Mappers (``vlprompt-world-clipcap``, ``vlprompt-world-capdec``) are stored under our names with their
:class:`~vlprompt.backbone.captioner.MapperConfig` in the metadata. Everything is fp16 safetensors (loaded into the
model's dtype) beside the tiny CLIPs in ``assets/models`` (or the vlprompt cache, :func:`embedded_weights_path`);
the model card ``vlprompt-world-captioner.json`` reports metrics measured on exactly this stored form.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlprompt.backbone.loading import embedded_weights_path
from vlprompt.errors import ConfigError, WeightsUnavailableError

#: The shipped world LM's name (``method.lm``).
WORLD_LM = "vlprompt-world-lm"
#: The shipped world mappers (``method.mapper_weights``), trained on ``vlprompt-tiny`` (world weights) embeddings.
WORLD_MAPPERS = ("vlprompt-world-clipcap", "vlprompt-world-capdec")
#: The model card of the three files.
WORLD_CARD = "vlprompt-world-captioner"
VOCABULARY_KEY = "vocabulary"
_KIND = "vlprompt-kind"
_CONFIG = "vlprompt-config"


def _opt_config(**fields: Any) -> Any:
    try:
        from transformers import OPTConfig
    except ImportError as err:
        raise ConfigError(
            "the world LM needs the optional dependency transformers (pip install 'vlprompt[caption]')"
        ) from err
    return OPTConfig(**fields)


def world_lm_config(
    vocab_size: int, bos: int, eos: int, width: int = 128, layers: int = 3, heads: int = 4, positions: int = 128
) -> Any:
    """The world LM's ``OPTConfig``: a ``width``-wide, ``layers``-deep OPT over a compact vocabulary (the pad is
    eos); ``positions`` covers prefix + BOS + caption."""
    return _opt_config(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, ffn_dim=4 * width,
        num_attention_heads=heads, max_position_embeddings=positions, word_embed_proj_dim=width,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, dropout=0.1, attention_dropout=0.0,
        tie_word_embeddings=True,
    )  # fmt: skip


def _asset(name_or_path: str | Path, kind: str) -> Path:
    """The file of a shipped name (in ``assets/models`` or the cache) or of a given path; a clear error if absent."""
    source = str(name_or_path)
    named = source == WORLD_LM or source in WORLD_MAPPERS
    path = embedded_weights_path(source) if named else Path(source).expanduser()
    if not path.is_file():
        how = (
            "Rebuild it with `python -m vlprompt.runners.world_captioner --world WORLD` (docs/embedded_world.md)"
            if named
            else "Give a shipped name or a file written by vlprompt.backbone.embedded_captioner"
        )
        raise WeightsUnavailableError(f"no {kind} weights for {source!r} at {path}. {how}")
    return path


def _metadata(path: Path, kind: str) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(_KIND) != kind:
        what = "LM" if kind == "lm" else kind
        raise ConfigError(f"{path} is not a world {what} file (it holds {meta.get(_KIND) or 'something else'})")
    return meta


def is_world_lm(source: Any) -> bool:
    """True for the shipped LM's name or a file written by :func:`save_world_lm`."""
    if not isinstance(source, str | Path):
        return False
    if str(source) == WORLD_LM:
        return True
    path = Path(source)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(_KIND) == "lm"


def _half(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}  # fmt: skip


def _write(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def save_world_lm(model: nn.Module, vocabulary: Sequence[int], path: Path, metadata: dict[str, str]) -> None:
    """Write an LM over a compact vocabulary (``vocabulary[i]`` = the BPE id of row ``i``) as fp16 safetensors; the
    tied output layer is not stored twice."""
    if len(vocabulary) != model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{len(vocabulary)} vocabulary ids for {model.get_input_embeddings().weight.shape[0]} rows")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors = _half(state) | {VOCABULARY_KEY: torch.tensor(list(vocabulary), dtype=torch.long)}
    _write(tensors, path, {**metadata, _KIND: "lm", _CONFIG: json.dumps(model.config.to_diff_dict())})


def load_world_lm(source: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, list[int]]:
    """The world LM (eval mode) and its vocabulary (BPE id of each row) from a shipped name or a file."""
    path = _asset(source, "world LM")
    config = _opt_config(**json.loads(_metadata(path, "lm")[_CONFIG]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(str(path))
    vocabulary = tensors.pop(VOCABULARY_KEY).tolist()
    reference = model.get_input_embeddings().weight
    tensors = {k: v.to(reference.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embedding
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval(), vocabulary


def world_lm_vocabulary(source: str | Path) -> list[int]:
    """Only the vocabulary of a world LM file (the BPE id of each row), without building the model."""
    path = _asset(source, "world LM")
    _metadata(path, "lm")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(VOCABULARY_KEY).tolist()


def save_mapper_weights(
    state: Mapping[str, Tensor], config: Mapping[str, Any], path: Path, metadata: dict[str, str]
) -> None:
    """Write a trained mapper's tensors (our names) and its shape (the options that built it) as fp16 safetensors."""
    _write(_half(state), path, {**metadata, _KIND: "mapper", _CONFIG: json.dumps(dict(config))})


def load_mapper_weights(source: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A world mapper's tensors (our names, fp16 as stored) and its ``MapperConfig`` fields, by name or file."""
    path = _asset(source, "mapper")
    meta = _metadata(path, "mapper")
    return load_file(str(path)), json.loads(meta[_CONFIG])
