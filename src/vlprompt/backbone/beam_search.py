"""Beam search of a causal LM after a prefix of embeddings: ``transformers``' ``generate`` result, less overhead.

:func:`beam_search` returns the token ids that ``lm.generate(inputs_embeds=[prefix ; lead], num_beams=K,
num_return_sequences=R, max_new_tokens=N, do_sample=False, length_penalty=a, eos_token_id=eos, pad_token_id=pad)``
returns with transformers 5.x (``GenerationMixin._beam_search``, its default ``early_stopping=False``; greedy search
for K = 1) when no logits processor is active (:func:`generation_overrides` names the LM's own generation settings
that would add one). Rules reproduced, per image:

- **candidates**: the running beams' accumulated log-probabilities (float32 ``log_softmax`` of the logits) plus each
  next token; the best ``2K`` over all ``K x V`` (``torch.topk``, the same tensor shapes so ties break the same
  way). At the first step only beam 0 is live (the others start at ``-1e9``), so the K identical beams do not
  propose the same tokens K times.
- **stopping**: a candidate is done when its token is eos or it reaches N tokens. The best K non-done candidates
  (done ones get ``-1e9``) run on; done candidates among the first K of the 2K enter the finished pool with the score
  ``sum log p / len ** a`` (``len`` = its new tokens; from embeddings the prompt counts 0), keeping its best K.
- **early stop** (per image, sticky): once the best running score divided by ``cur_len ** a`` (``cur_len`` = tokens
  generated so far, the "current length" heuristic of ``early_stopping=False``) cannot beat the worst of a full pool,
  the image's pool is frozen. The loop ends when every image is frozen or N tokens are reached.
- **output**: the best R of each pool, best first; rows are filled past their end with ``pad`` (eos when ``pad`` is
  0, as transformers' ``pad or eos`` fill does) and cropped to the longest returned row.

Faster than ``generate`` because the prefix is run once per image (batch B, not B·K: attention is causal, so its
keys and values are the same for every beam) and its cache repeated to the K beams; each step is one LM call on the
B·K new tokens and one ``index_select`` of the cache per layer, with no generic machinery (processors, criteria
objects, mask building) around it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.errors import ConfigError

#: The score given to what may not be chosen (transformers' constant: finished beams stop running, and so on).
_BLOCKED = -1.0e9

#: Generation settings of an LM's own ``generation_config`` that make ``generate`` add a logits processor or a
#: stopping rule (a default of ``None`` or these values adds none), so :func:`beam_search` would no longer match.
_NEUTRAL_SETTINGS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "watermarking_config": None,
    "max_time": None,
    "stop_strings": None,
    "early_stopping": False,
}


def generation_overrides(lm: nn.Module) -> list[str]:
    """Names of the LM's own generation settings (``lm.generation_config``, which ``generate`` merges under the
    caller's) that change what ``generate`` returns from what :func:`beam_search` reproduces; empty for the LMs
    built here and OPT's / GPT-2's published configs."""
    config = getattr(lm, "generation_config", None)
    if config is None:
        return []
    out = []
    for name, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            out.append(name)
    return out


def cache_keyword(lm: nn.Module) -> str:
    """The LM's keyword for a key/value cache (``cache`` from transformers 5.25 on, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache_of(outputs: Any) -> Any:
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


class _Decoder:
    """The LM after a prefill: ``step(ids)`` feeds one token per row and returns float32 next-token logits."""

    def __init__(self, lm: nn.Module, embeds: Tensor) -> None:
        self.lm, self.keyword = lm, cache_keyword(lm)
        # attention_mask=None: every position is real, the models then use plain causal attention and positions
        # past_length + i, as generate's all-ones mask gives
        out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        self.cache = _cache_of(out)
        self.first_logits = out.logits[:, -1].float()

    def step(self, ids: Tensor) -> Tensor:
        out = self.lm(input_ids=ids[:, None], use_cache=True, **{self.keyword: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1].float()


def _greedy(decoder: _Decoder, max_new_tokens: int, eos_id: int, pad_id: int) -> Tensor:
    """Greedy search (``generate`` with one beam): argmax of the logits; rows that ended continue with ``pad``."""
    logits = decoder.first_logits
    running = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens: list[Tensor] = []
    for t in range(max_new_tokens):
        token = torch.where(running, logits.argmax(-1), pad_id)
        tokens.append(token)
        running = running & (token != eos_id)
        if t + 1 == max_new_tokens or not bool(running.any()):
            break
        logits = decoder.step(token)
    return torch.stack(tokens, dim=1)


def _beam(
    decoder: _Decoder, num_beams: int, num_return: int, max_new_tokens: int, length_penalty: float, eos_id: int,
    fill: int,
) -> Tensor:  # fmt: skip
    """The beam search of the module docstring on ``B`` images whose prefix the decoder has read (batch ``B``)."""
    first = decoder.first_logits
    b, k, n, dev = first.shape[0], num_beams, max_new_tokens, first.device
    decoder.cache.batch_repeat_interleave(k)  # beams b*K .. b*K+K-1 of image b share its prefix's keys and values
    logits = first.repeat_interleave(k, dim=0)

    run_tokens = torch.full((b, k, n), fill, dtype=torch.long, device=dev)
    run_scores = torch.zeros(b, k, device=dev)
    run_scores[:, 1:] = _BLOCKED
    pool_tokens, pool_scores = run_tokens.clone(), torch.full((b, k), _BLOCKED, device=dev)
    pool_done = torch.zeros(b, k, dtype=torch.bool, device=dev)
    pool_len = torch.zeros(b, k, dtype=torch.long, device=dev)  # new tokens of each pooled row (0: a placeholder)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    in_top_k = torch.arange(2 * k, device=dev) < k  # only the first K candidates may enter the pool
    image_offset = torch.arange(b, device=dev)[:, None] * k

    for t in range(n):
        length = t + 1  # new tokens of every candidate of this step
        vocab = logits.shape[-1]
        scores = (F.log_softmax(logits, dim=-1).view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
        cand_scores, flat = torch.topk(scores, 2 * k)
        source, token = flat // vocab, flat % vocab
        cand_tokens = run_tokens.gather(1, source[:, :, None].expand(-1, -1, n)).clone()
        cand_tokens[:, :, t] = token
        done = (token == eos_id) | (length >= n)

        # the best K candidates still running continue
        open_scores = cand_scores + done.float() * _BLOCKED
        keep = torch.topk(open_scores, k).indices
        run_tokens = cand_tokens.gather(1, keep[:, :, None].expand(-1, -1, n))
        run_scores = open_scores.gather(1, keep)
        run_source = source.gather(1, keep)

        # done candidates among the first K enter the pool (unless the image's pool is frozen); it keeps its best K
        entering = done & in_top_k
        pooled = cand_scores / (length**length_penalty)
        pooled = pooled + (~improvable).float() * _BLOCKED
        pooled = pooled + (~entering).float() * _BLOCKED
        best = torch.topk(torch.cat([pool_scores, pooled], dim=1), k).indices
        pool_tokens = torch.cat([pool_tokens, cand_tokens], dim=1).gather(1, best[:, :, None].expand(-1, -1, n))
        pool_scores = torch.cat([pool_scores, pooled], dim=1).gather(1, best)
        pool_done = torch.cat([pool_done, entering], dim=1).gather(1, best)
        pool_len = torch.cat([pool_len, torch.full_like(source, length)], dim=1).gather(1, best)

        # can a running beam still beat the pool's worst? ("current length" heuristic; -1e9 while the pool is short)
        best_running = run_scores[:, :1] / (length**length_penalty)
        worst_pooled = torch.where(pool_done, pool_scores.min(dim=1, keepdim=True).values, _BLOCKED)
        improvable = improvable & (best_running > worst_pooled).any(dim=1, keepdim=True)
        if length >= n or not bool(improvable.any()):
            break
        decoder.cache.reorder_cache((run_source + image_offset).view(-1))
        logits = decoder.step(run_tokens[:, :, t].reshape(-1))

    width = int(pool_len[:, :num_return].max())
    return pool_tokens[:, :num_return, :width].reshape(b * num_return, width)


@torch.no_grad()
def beam_search(
    lm: nn.Module,
    prefix_embeds: Tensor,
    lead_ids: Tensor | None,
    num_beams: int,
    num_return: int,
    max_new_tokens: int,
    length_penalty: float,
    eos_id: int,
    pad_id: int,
) -> Tensor:
    """Token ids ``[B * num_return, T <= max_new_tokens]`` (best first per image) of beam search from
    ``[prefix_embeds ; embeddings of lead_ids]`` (``[B, P, E]``; ``lead_ids`` ``[B, L]`` or None): ``generate``'s
    ids for that input (module docstring), new tokens only, rows ended by eos then filled."""
    if num_beams < 1 or not 1 <= num_return <= num_beams or max_new_tokens < 1:
        raise ConfigError(
            f"beam search needs num_beams >= 1, 1 <= num_return <= num_beams and max_new_tokens >= 1; got "
            f"num_beams={num_beams}, num_return={num_return}, max_new_tokens={max_new_tokens}"
        )
    embeds = prefix_embeds.detach()
    if lead_ids is not None:
        lead = lm.get_input_embeddings()(lead_ids.to(embeds.device)).to(embeds.dtype)
        embeds = torch.cat([embeds, lead], dim=1)
    decoder = _Decoder(lm, embeds)
    if num_beams == 1:  # generate switches to greedy search, which fills with pad itself
        return _greedy(decoder, max_new_tokens, eos_id, pad_id)
    fill = pad_id if pad_id else eos_id  # transformers fills beam rows with `pad or eos`: a pad id of 0 gives eos
    return _beam(decoder, num_beams, num_return, max_new_tokens, length_penalty, eos_id, fill)
