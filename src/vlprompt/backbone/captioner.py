"""Captioning from a CLIP embedding: ClipCap's mappers (Mokady et al., 2021) in front of a frozen causal LM.

A CLIP embedding (L2-normalised by default, as RLCF and CapDec feed it) goes through a trainable **mapper** to a
prefix of ``P`` embeddings in the LM's input space; a frozen ``transformers`` causal LM (OPT, GPT-2, ...) reads
``[prefix ; BOS ; caption tokens]``. Two mappers, with the layouts of ClipCap's code (so its, CapDec's and RLCF's
public ``.pt`` checkpoints load by key mapping, :func:`mapper_state_from_reference`):

- :class:`TransformerMapper`: a linear layer maps the embedding to ``clip_length`` tokens, ``prefix_length``
  learned constant tokens follow, a pre-norm transformer (ReLU MLP of ratio 2, queries and keys/values without bias,
  8 heads) runs over both, and its outputs at the constant positions are the prefix (RLCF: 8 layers, P = 40,
  clip length 40).
- :class:`MLPMapper`: ``clip_dim -> P*E/2 -> P*E`` with tanh (ClipCap's default).

Tokenizers (:class:`CaptionTokenizer`): a real LM uses its own (``AutoTokenizer`` from the same folder / Hub id);
eos is the id of ``"\\n"`` (what RLCF and ClipCap-OPT stop beam search at). A model without tokenizer files (a
randomly initialised LM, the embedded world's) uses open_clip's bundled BPE (``bpe_simple_vocab_16e6.txt.gz``)
through open_clip's own ``SimpleTokenizer``: it is installed with open_clip, reads text exactly as the CLIP side
does, and needs no files written or downloaded. That BPE drops whitespace, so ``"\\n"`` has no token there: its
BOS/eos are CLIP's start/end-of-text ids. Either way BOS (when the tokenizer has one) is an *input* before the
caption, so training, decoding and test-time adaptation all see ``[prefix ; BOS ; tokens]``.

``transformers`` is an optional dependency (extra ``caption``), imported only when an LM or tokenizer is built.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.beam_search import beam_search, cache_keyword, generation_overrides
from vlprompt.backbone.embedded_captioner import is_world_lm, load_world_lm, world_lm_vocabulary
from vlprompt.backbone.loading import hub_offline_reason
from vlprompt.errors import ConfigError, WeightsUnavailableError
from vlprompt.safe_pickle import load_torch_tensors

log = logging.getLogger("vlprompt.backbone")

#: Prefix of an ``lm`` source that builds a randomly initialised LM from ``transformers``' default config of that
#: model type (``random:opt`` is OPT-125m's shape, ``random:gpt2`` GPT-2 small's): benchmarks and tests, no files.
RANDOM_LM = "random:"


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(
            "the captioner needs the optional dependency transformers (pip install 'vlprompt[caption]')"
        ) from err
    return transformers


# ---- mappers ---------------------------------------------------------------------------------------------------
@dataclass
class MapperConfig:
    """Shape of a mapper (``kind`` transformer | mlp); ``embed_dim`` is the LM's input embedding width."""

    kind: str = "transformer"
    clip_dim: int = 512
    embed_dim: int = 768
    prefix_length: int = 40
    clip_length: int = 40
    num_layers: int = 8
    num_heads: int = 8
    mlp_ratio: float = 2.0


class MLPMapper(nn.Module):
    """ClipCap's MLP mapper: ``clip_dim -> P*E // 2 -> P*E`` with tanh between; output ``[B, P, E]``."""

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int) -> None:
        super().__init__()
        width = embed_dim * prefix_length
        self.prefix_length, self.embed_dim = prefix_length, embed_dim
        self.net = nn.Sequential(nn.Linear(clip_dim, width // 2), nn.Tanh(), nn.Linear(width // 2, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.embed_dim)


class MapperAttention(nn.Module):
    """Multi-head self-attention with ClipCap's projections: queries and stacked keys/values without bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"mapper width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)  # rows: all keys, then all values (ClipCap's layout)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class MapperBlock(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))`` then ``x + fc2(relu(fc1(norm2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), MapperAttention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.relu(self.fc1(self.norm2(x))))


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: embedding -> ``clip_length`` tokens, + ``prefix_length`` learned constants,
    a transformer over both; the outputs at the constants' positions are the prefix ``[B, P, E]``."""

    def __init__(self, cfg: MapperConfig) -> None:
        super().__init__()
        e = cfg.embed_dim
        self.clip_length = cfg.clip_length
        self.project = nn.Linear(cfg.clip_dim, cfg.clip_length * e)
        self.const = nn.Parameter(torch.randn(cfg.prefix_length, e))
        self.blocks = nn.ModuleList(MapperBlock(e, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.project(x).view(x.shape[0], self.clip_length, -1)
        h = torch.cat([tokens, self.const.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            h = block(h)
        return h[:, self.clip_length :]


def build_mapper(cfg: MapperConfig) -> nn.Module:
    """The mapper ``cfg`` describes."""
    if cfg.kind == "transformer":
        return TransformerMapper(cfg)
    if cfg.kind == "mlp":
        return MLPMapper(cfg.clip_dim, cfg.embed_dim, cfg.prefix_length)
    raise ConfigError(f"mapper must be 'transformer' or 'mlp', got {cfg.kind!r}")


# ---- reference checkpoints -------------------------------------------------------------------------------------
#: ClipCap's mapper names (below ``clip_project.``; the same in CapDec's and RLCF's code) and ours, ``{i}`` a layer.
_REFERENCE_NAMES = (
    ("linear.", "project."),
    ("prefix_const", "const"),
    ("transformer.layers.{i}.attn.to_queries.", "blocks.{i}.attn.q."),
    ("transformer.layers.{i}.attn.to_keys_values.", "blocks.{i}.attn.kv."),
    ("transformer.layers.{i}.attn.project.", "blocks.{i}.attn.out."),
    ("transformer.layers.{i}.mlp.fc1.", "blocks.{i}.fc1."),
    ("transformer.layers.{i}.mlp.fc2.", "blocks.{i}.fc2."),
    ("transformer.layers.{i}.norm1.", "blocks.{i}.norm1."),
    ("transformer.layers.{i}.norm2.", "blocks.{i}.norm2."),
    ("model.{i}.", "net.{i}."),  # the MLP mapper's nn.Sequential
)
_REFERENCE_PREFIX = "clip_project."


def _rename(key: str, to_ours: bool) -> str | None:
    """``key`` under the other naming (a name prefix, or a whole name without a trailing dot), or None."""
    for ref, ours in _REFERENCE_NAMES:
        src, dst = (ref, ours) if to_ours else (ours, ref)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)") + ("" if src.endswith(".") else "$")
        found = re.match(pattern, key)
        if found:
            head = dst.replace("{i}", found.group(1)) if found.groups() else dst
            return head + key[found.end() :]
    return None


def mapper_state_from_reference(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The mapper tensors of a ClipCap / CapDec / RLCF checkpoint (``clip_project.*``, optionally wrapped in
    ``state_dict`` and ``module.``) under our names; the LM's tensors in the file are ignored."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # RLCF's training checkpoints: {'epoch', 'state_dict', 'optimizer', ...}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if not key.startswith(_REFERENCE_PREFIX) or not isinstance(value, Tensor):
            continue
        ours = _rename(key[len(_REFERENCE_PREFIX) :], to_ours=True)
        if ours is None:
            raise ConfigError(f"mapper checkpoint tensor {key!r} has no counterpart here (another mapper type?)")
        out[ours] = value
    if not out:
        raise ConfigError("the checkpoint holds no mapper tensors (clip_project.*): not a ClipCap/CapDec/RLCF model")
    return out


def mapper_state_to_reference(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our mapper tensors under ClipCap's names (``clip_project.*``): the inverse of the import."""
    return {_REFERENCE_PREFIX + _rename(k, to_ours=False): v for k, v in state.items()}


def mapper_config_from_state(state: Mapping[str, Tensor], embed_dim: int, num_heads: int = 8) -> MapperConfig:
    """The mapper shape a state dict (our names) was saved from; heads cannot be read off (ClipCap always uses 8)."""
    if "const" in state:
        p, e = state["const"].shape
        layers = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
        hidden = state["blocks.0.fc1.weight"].shape[0] if layers else int(2 * e)
        w = state["project.weight"]
        return MapperConfig("transformer", w.shape[1], e, p, w.shape[0] // e, len(layers), num_heads, hidden / e)
    first, last = state["net.0.weight"], state["net.2.weight"]
    return MapperConfig("mlp", first.shape[1], embed_dim, last.shape[0] // embed_dim, 0, 0, 0)


def load_mapper_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A public ClipCap / CapDec / RLCF ``.pt`` (tensors only, never code) -> the mapper tensors under our names."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"mapper checkpoint not found: {path}. Download the ClipCap / CapDec / RLCF captioning weights "
            "on a machine with internet and pass the .pt file's path"
        )
    return mapper_state_from_reference(load_torch_tensors(path, "mapper checkpoint"))


# ---- tokenizer -------------------------------------------------------------------------------------------------
@dataclass
class CaptionTokenizer:
    """What the captioner needs from a tokenizer: ids of texts (no special tokens), text of ids, special ids.

    ``bos_id`` is None for tokenizers that add no BOS (GPT-2): the prefix is then followed directly by the caption.
    """

    encode_fn: Callable[[list[str]], list[list[int]]]
    decode_fn: Callable[[list[int]], str]
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    name: str

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encode_fn(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first eos, stripped (the reference's ``batch_decode(...).strip()``)."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.decode_fn(ids).strip()

    @classmethod
    def from_transformers(cls, tok: Any) -> CaptionTokenizer:
        """A ``transformers`` tokenizer: its own BOS if it adds one, eos = the id of ``"\\n"``."""
        newline = tok("\n", add_special_tokens=False).input_ids
        if len(newline) != 1:
            raise ConfigError(f"tokenizer {type(tok).__name__} has no single token for a newline (the caption end)")
        with_special = tok("a").input_ids
        bos = tok.bos_token_id if tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id] else None
        pad = tok.pad_token_id if tok.pad_token_id is not None else newline[0]
        return cls(
            lambda texts: tok(texts, add_special_tokens=False).input_ids,
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            bos, newline[0], pad, len(tok), type(tok).__name__,
        )  # fmt: skip

    @classmethod
    def clip_bpe(cls, vocabulary: Sequence[int] | None = None) -> CaptionTokenizer:
        """open_clip's bundled BPE (lower-cased, whitespace dropped): BOS/eos = CLIP's start/end-of-text.

        ``vocabulary`` (an LM with a compact token table, :mod:`~vlprompt.backbone.embedded_captioner`): the BPE id
        of each LM row; ids are mapped to rows and back, the pad is eos, and a BPE token without a row (only text
        the LM did not write can hold one) is dropped from the encoding with one warning."""
        from open_clip.tokenizer import SimpleTokenizer

        bpe = SimpleTokenizer()
        special = {bpe.sot_token_id, bpe.eot_token_id}
        if vocabulary is None:
            return cls(
                lambda texts: [bpe.encode(t) for t in texts],
                lambda ids: bpe.decode([i for i in ids if i not in special]),  # as skip_special_tokens does
                bpe.sot_token_id, bpe.eot_token_id, 0, len(bpe.encoder), "open_clip-bpe",
            )  # fmt: skip
        to_bpe = list(vocabulary)
        to_row = {b: r for r, b in enumerate(to_bpe)}
        if bpe.sot_token_id not in to_row or bpe.eot_token_id not in to_row:
            raise ConfigError("a compact BPE vocabulary must hold CLIP's start- and end-of-text tokens")
        dropped: set[int] = set()

        def encode(texts: list[str]) -> list[list[int]]:
            out = [[to_row.get(i, -1) for i in bpe.encode(t)] for t in texts]
            if any(-1 in row for row in out) and not dropped:
                dropped.update(i for t in texts for i in bpe.encode(t) if i not in to_row)
                words = ", ".join(repr(bpe.decoder[i]) for i in sorted(dropped)[:5])
                log.warning("the captioner's LM has no row for BPE tokens %s; they are left out of its input", words)
            return [[r for r in row if r >= 0] for row in out]

        eos = to_row[bpe.eot_token_id]
        return cls(
            encode,
            lambda ids: bpe.decode([to_bpe[i] for i in ids if to_bpe[i] not in special]),
            to_row[bpe.sot_token_id], eos, eos, len(to_bpe), f"open_clip-bpe[{len(to_bpe)}]",
        )  # fmt: skip


def _local_only(source: str) -> bool:
    """Read ``source`` from disk or the cache only: a folder, or a Hub id while the Hub is unreachable/offline."""
    return Path(source).exists() or hub_offline_reason() is not None


def load_tokenizer(source: str, kind: str = "auto") -> CaptionTokenizer:
    """``kind``: ``lm`` (``AutoTokenizer`` from ``source``), ``clip-bpe``, or ``auto`` (clip-bpe for ``random:``);
    the embedded world LM always reads open_clip's BPE through its compact vocabulary."""
    if is_world_lm(source):
        return CaptionTokenizer.clip_bpe(world_lm_vocabulary(source))
    if kind == "clip-bpe" or (kind == "auto" and source.startswith(RANDOM_LM)):
        return CaptionTokenizer.clip_bpe()
    if kind not in ("auto", "lm"):
        raise ConfigError(f"tokenizer must be auto, lm or clip-bpe, got {kind!r}")
    transformers = _transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=_local_only(source))
    except Exception as err:  # transformers reports missing files with several types
        raise WeightsUnavailableError(
            f"no tokenizer for the captioner's LM at {source} ({type(err).__name__}: {err})"
        ) from err
    return CaptionTokenizer.from_transformers(tok)


# ---- language model ----------------------------------------------------------------------------------------------
def load_causal_lm(source: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """A ``transformers`` causal LM from a folder / Hub id (the local cache only when offline), ``random:TYPE``,
    a config object (random init), an already built model, or the embedded world LM (``vlprompt-world-lm``)."""
    if isinstance(source, nn.Module):
        return source
    if is_world_lm(source):
        return load_world_lm(source, dtype)[0]
    transformers = _transformers()
    if not isinstance(source, str | Path):  # a PretrainedConfig
        return transformers.AutoModelForCausalLM.from_config(source, dtype=dtype)
    source = str(source)
    if source.startswith(RANDOM_LM):
        config = transformers.AutoConfig.for_model(source[len(RANDOM_LM) :])
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    local = _local_only(source)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=local, dtype=dtype)
    except Exception as err:  # missing folder, file or cache entry
        where = "a local folder or the Hugging Face cache" if local else "the Hugging Face Hub"
        raise WeightsUnavailableError(
            f"could not load the captioner's language model {source} from {where} ({type(err).__name__}: {err}). "
            f"Download it on a machine with internet (`huggingface-cli download {source} --local-dir DIR`) and "
            "pass DIR"
        ) from err


class Captioner(nn.Module):
    """A trainable mapper in front of a frozen causal LM; the LM stays in eval mode and never gets a gradient."""

    #: Beam search implementation: ``"vlprompt"`` (:mod:`vlprompt.backbone.beam_search`, ``generate``'s ids, faster)
    #: or ``"transformers"`` (``lm.generate``); set on the class or on one captioner.
    beam_impl: str = "vlprompt"

    def __init__(self, mapper: nn.Module, lm: nn.Module, tokenizer: CaptionTokenizer, normalize_input: bool = True):
        super().__init__()
        self.mapper = mapper
        self.lm = lm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.normalize_input = normalize_input  # RLCF / CapDec: L2-normalised; ClipCap's own weights: raw embeddings
        rows = lm.get_input_embeddings().weight.shape[0]
        if tokenizer.vocab_size > rows:
            raise ConfigError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens, the LM only {rows} rows")

    @functools.cached_property
    def _cache_arg(self) -> str:
        """The LM's keyword for a key/value cache (``cache`` from transformers 5.25 on, ``past_key_values`` before)."""
        return cache_keyword(self.lm)

    @property
    def embed_dim(self) -> int:
        return int(self.lm.get_input_embeddings().weight.shape[1])

    @property
    def prefix_length(self) -> int:
        return int(self.mapper.const.shape[0] if hasattr(self.mapper, "const") else self.mapper.prefix_length)

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        self.lm.eval()  # frozen: no dropout in the LM while the mapper trains (as ClipCap's prefix-only training)
        return self

    def prefix(self, clip_embeds: Tensor) -> Tensor:
        """Prefix embeddings ``[B, P, E]`` (the LM's dtype) of CLIP embeddings ``[B, D]``."""
        x = clip_embeds.float()
        if self.normalize_input:
            x = F.normalize(x, dim=-1)
        dtype = self.lm.get_input_embeddings().weight.dtype
        return self.mapper(x.to(next(self.mapper.parameters()).dtype)).to(dtype)

    def _lead(self, n: int, device: torch.device) -> Tensor | None:
        bos = self.tokenizer.bos_id
        if bos is None:
            return None
        return self.lm.get_input_embeddings()(torch.full((n, 1), bos, device=device))

    def logits(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
        """Logits of the last ``keep`` positions of ``[prefix ; input_ids]`` (right-padded ids and their mask);
        only those positions go through the LM head, never the prefix's. One prefix ``[1, P, E]`` for several
        captions is read once (:meth:`_shared_prefix_logits`)."""
        n = input_ids.shape[0]
        if prefix.shape[0] == 1 and n > 1 and keep <= input_ids.shape[1] + 1:
            return self._shared_prefix_logits(prefix, input_ids, attention_mask, keep)
        prefix = prefix.expand(n, -1, -1) if prefix.shape[0] == 1 else prefix
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(n, prefix.shape[1]), attention_mask], dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits

    def _shared_prefix_logits(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
        """:meth:`logits` of ``n`` captions after one shared prefix: the LM reads the prefix once and the captions
        attend to its cached keys and values. Attention is causal, so the prefix's states do not depend on what
        follows it and the result is the batched pass's (to float rounding) at ``P + n·L`` tokens instead of
        ``n·(P + L)``; the gradient reaches the prefix through the shared cache. RLCF's K candidates of one image
        are such a batch (the reference repeats the prefix K times)."""
        n, p = input_ids.shape[0], prefix.shape[1]
        head = self.lm(inputs_embeds=prefix, attention_mask=attention_mask.new_ones(1, p), use_cache=True,
                       logits_to_keep=1)  # fmt: skip
        cache = head["cache"] if "cache" in head else head["past_key_values"]  # `cache` from transformers 5.25 on
        cache.batch_repeat_interleave(n)
        mask = torch.cat([attention_mask.new_ones(n, p), attention_mask], dim=1)
        embeds = self.lm.get_input_embeddings()(input_ids)
        tail = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **{self._cache_arg: cache},
                       logits_to_keep=min(keep, input_ids.shape[1])).logits  # fmt: skip
        if keep > input_ids.shape[1]:  # the last prefix position predicts the first token (the reference's layout)
            tail = torch.cat([head.logits[:, -1:].expand(n, -1, -1), tail], dim=1)
        return tail

    @torch.no_grad()
    def beam_search(
        self,
        prefix: Tensor,
        num_beams: int,
        num_return: int = 1,
        max_new_tokens: int = 50,
        length_penalty: float = 1.0,
    ) -> Tensor:
        """Token ids ``[B * num_return, <= max_new_tokens]`` (best first per image, eos then pads ending each) of
        beam search from ``[prefix ; BOS]``: no sampling, no repetition penalty (the spec's settings).

        :attr:`beam_impl` ``"vlprompt"`` runs :func:`~vlprompt.backbone.beam_search.beam_search` (``generate``'s ids,
        the prefix read once per image); ``"transformers"`` calls ``generate``, as does an LM whose own generation
        config adds a logits processor (:func:`~vlprompt.backbone.beam_search.generation_overrides`)."""
        tok = self.tokenizer
        prefix = prefix.detach()
        if self.beam_impl not in ("vlprompt", "transformers"):
            raise ConfigError(f"Captioner.beam_impl must be 'vlprompt' or 'transformers', got {self.beam_impl!r}")
        if self.beam_impl == "vlprompt" and not generation_overrides(self.lm):
            lead = None if tok.bos_id is None else torch.full((prefix.shape[0], 1), tok.bos_id, device=prefix.device)
            return beam_search(self.lm, prefix, lead, num_beams, num_return, max_new_tokens, length_penalty,
                               tok.eos_id, tok.pad_id)  # fmt: skip
        transformers = _transformers()
        lead = self._lead(prefix.shape[0], prefix.device)
        embeds = prefix if lead is None else torch.cat([prefix, lead.to(prefix.dtype)], dim=1)
        config = transformers.GenerationConfig(
            num_beams=num_beams, num_return_sequences=num_return, max_new_tokens=max_new_tokens, do_sample=False,
            length_penalty=length_penalty, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
        )  # fmt: skip
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        # the LM is always in eval mode; inputs given as embeddings make generate return the new tokens only
        return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)

    def generate(
        self,
        prefix: Tensor,
        num_beams: int,
        num_return: int = 1,
        max_new_tokens: int = 50,
        length_penalty: float = 1.0,
    ) -> list[list[str]]:
        """``num_return`` captions (best first) per image of the batch ``prefix`` ``[B, P, E]``, by beam search."""
        ids = self.beam_search(prefix, num_beams, num_return, max_new_tokens, length_penalty)
        texts = [self.tokenizer.decode(row) for row in ids.tolist()]
        return [texts[i : i + num_return] for i in range(0, len(texts), num_return)]


def build_captioner(
    lm: Any,
    clip_dim: int,
    mapper: str = "transformer",
    prefix_length: int = 40,
    clip_length: int = 40,
    num_layers: int = 8,
    num_heads: int = 8,
    tokenizer: str | CaptionTokenizer = "auto",
    dtype: torch.dtype | None = None,
    normalize_input: bool = True,
) -> Captioner:
    """A captioner for CLIP embeddings of width ``clip_dim``; ``lm`` is a folder / Hub id / ``random:TYPE`` / config
    / model. A string ``tokenizer`` picks the kind (:func:`load_tokenizer`); a config or model needs an object."""
    model = load_causal_lm(lm, dtype)
    if not isinstance(tokenizer, CaptionTokenizer):
        if not isinstance(lm, str | Path) and tokenizer in ("auto", "lm"):
            tokenizer = "clip-bpe"  # a config or model object has no tokenizer files to read
        tokenizer = load_tokenizer(str(lm), tokenizer)
    embed = int(model.get_input_embeddings().weight.shape[1])
    cfg = MapperConfig(mapper, clip_dim, embed, prefix_length, clip_length, num_layers, num_heads)
    return Captioner(build_mapper(cfg), model, tokenizer, normalize_input)
