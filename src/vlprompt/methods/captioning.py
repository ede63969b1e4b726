"""Captioning with a CLIP prefix: ClipCap (Mokady et al., 2021) and CapDec (Nukrai et al., 2022).

A frozen CLIP embeds the input, a trainable mapper turns the embedding into an LM prefix, a frozen causal LM
(:mod:`vlprompt.backbone.captioner`) writes the caption. Only the mapper trains, by teacher-forced cross-entropy:

- ``clipcap``: the prefix comes from the CLIP *image* embedding (L2-normalised).
- ``capdec``: text-only training: the CLIP *text* embedding of the caption itself, L2-normalised, plus Gaussian
  noise of variance 0.016, L2-normalised again (CapDec's ``noise_injection``). The noise is training's only: at
  test time CapDec captions image embeddings exactly as ClipCap does.

The loss (default): the LM reads ``[prefix ; BOS ; t_1..t_n]`` and predicts ``t_1..t_n, eos`` (eos = the
tokenizer's ``"\\n"``), pads masked, the token-mean per caption, then the mean over captions.
``reference_loss_quirks=true`` reproduces the reference code's loss (RLCF spec section 7, item 7) instead: the
targets are the tokenizer's output itself, ``[BOS, t_1..t_n]`` (BOS predicted from the last prefix position, no eos),
with ``ignore_index=0``. In training the reference pads with 0, so pads are ignored and the loss is the token-mean
over the batch; at test time (RLCF) it re-tokenises with OPT's tokenizer, whose pad is 1, so the pads are *counted*
and each caption's CE is averaged over the batch's padded length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone import Backbone
from vlprompt.backbone.captioner import (
    Captioner,
    CaptionTokenizer,
    build_captioner,
    load_mapper_checkpoint,
    mapper_state_from_reference,
)
from vlprompt.backbone.embedded_captioner import load_mapper_weights
from vlprompt.errors import ConfigError
from vlprompt.methods.base import Method, register_method
from vlprompt.options import choice, count, nonneg

#: CapDec's noise variance on the normalised CLIP text embedding (its paper and RLCF's training scripts).
CAPDEC_NOISE_VARIANCE = 0.016
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- teacher forcing ---------------------------------------------------------------------------------------------
@dataclass
class TeacherForcing:
    """A batch of captions laid out for one teacher-forced pass after the prefix.

    ``logits(prefix)[i, j]`` predicts ``targets[i, j]``; ``weights[i]`` turns the per-position CE into caption
    ``i``'s loss (``sum_j weights[i, j] * CE[i, j]``): zero at masked positions.
    """

    input_ids: Tensor  # [N, L] right-padded with the tokenizer's pad id
    attention_mask: Tensor  # [N, L]
    targets: Tensor  # [N, T]
    weights: Tensor  # [N, T]
    keep: int  # logits of the last `keep` positions are computed ...
    drop_last: bool  # ... without the very last one (the reference's layout)

    def to(self, device: torch.device) -> TeacherForcing:
        return TeacherForcing(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                              self.weights.to(device), self.keep, self.drop_last)  # fmt: skip


def _pad(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def teacher_forcing(
    tokenizer: CaptionTokenizer, texts: Sequence[str], reference_quirks: bool = False, training: bool = False
) -> TeacherForcing:
    """Inputs, targets and per-caption weights of ``texts`` (see the module docstring for both layouts).

    ``training`` matters only with ``reference_quirks``: the reference's training loss ignores pads and averages
    over the batch's tokens; its test-time loss counts pads and averages per caption over the padded length.
    """
    tok = tokenizer
    lead = [] if tok.bos_id is None else [tok.bos_id]
    tokens = tok.encode(texts)
    inputs, mask = _pad([lead + t for t in tokens], tok.pad_id)  # right-padded [BOS ; tokens], both layouts
    if not reference_quirks:
        targets, valid = _pad([t + [tok.eos_id] for t in tokens], -100)
        weights = valid.float() / valid.sum(1, keepdim=True).float()
        return TeacherForcing(inputs, mask, targets, weights, targets.shape[1], drop_last=False)
    # the reference's dataset pads training captions with 0; its TTA tokenizer call pads with the pad id
    targets = inputs.masked_fill(mask == 0, 0) if training else inputs.clone()
    counted = (targets != 0).float()  # cross_entropy(ignore_index=0, reduction="none") is 0 there
    if training:  # one token-mean over the whole batch, written as per-caption weights whose mean is that
        weights = counted * len(texts) / counted.sum().clamp(min=1)
    else:  # per caption .mean(dim=-1) over the padded length, pads (id 1 for OPT) included
        weights = counted / targets.shape[1]
    return TeacherForcing(inputs, mask, targets, weights, targets.shape[1] + 1, drop_last=True)


def caption_losses(captioner: Captioner, prefix: Tensor, batch: TeacherForcing) -> Tensor:
    """Per-caption CE ``[N]`` of one batched teacher-forced pass; ``prefix`` is ``[N, P, E]`` or ``[1, P, E]``
    (one image's prefix shared by all N captions: its mapper output and graph are computed once)."""
    batch = batch.to(prefix.device)
    logits = captioner.logits(prefix, batch.input_ids, batch.attention_mask, batch.keep)
    if batch.drop_last:
        logits = logits[:, :-1]
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none", ignore_index=-100)
    return (ce.view_as(batch.weights) * batch.weights).sum(dim=1)


def noisy_embedding(x: Tensor, variance: float, generator: torch.Generator | None = None) -> Tensor:
    """CapDec's training input: ``normalize(normalize(x) + N(0, variance))``."""
    x = F.normalize(x.float(), dim=-1)
    if variance <= 0:
        return x
    device = x.device if generator is None else generator.device
    noise = torch.randn(x.shape, generator=generator, device=device).to(x.device)
    return F.normalize(x + noise * variance**0.5, dim=-1)


# ---- the method --------------------------------------------------------------------------------------------------
@dataclass
class CaptionerOptions:
    """The captioner: LM, tokenizer, mapper shape (RLCF's defaults: OPT-125m, transformer mapper 8x8, P = 40)."""

    lm: str = "facebook/opt-125m"  # folder / Hub id of a transformers causal LM, or random:opt / random:gpt2
    lm_dtype: str = choice("fp32", "fp32", "fp16", "bf16")  # the reference loads OPT in fp16 (on GPU)
    tokenizer: str = choice("auto", "auto", "lm", "clip-bpe")  # auto: the LM's own; open_clip's BPE for random:
    mapper: str = choice("transformer", "transformer", "mlp")
    prefix_length: int = count(40)
    clip_length: int = count(40)  # transformer mapper: tokens the CLIP embedding is mapped to
    mapper_layers: int = count(8)
    mapper_heads: int = count(8)
    normalize_input: bool = True  # L2-normalise the CLIP embedding (RLCF, CapDec); ClipCap's own weights: false
    max_new_tokens: int = count(50)
    final_beams: int = count(5)  # beams of the final caption
    reference_checkpoint: str = ""  # a ClipCap / CapDec / RLCF mapper .pt to start from
    # a mapper saved by vlprompt to start from: a shipped world mapper (vlprompt-world-clipcap, vlprompt-world-capdec)
    # or such a .safetensors file (vlprompt.backbone.embedded_captioner)
    mapper_weights: str = ""
    # the evaluation CLIP of CLIPScore / RefCLIPScore (runners.caption); "" = the policy CLIP itself
    clipscore_model: str = ""  # Hessel et al. and RLCF's Table 3: ViT-B-32, openai
    clipscore_pretrained: str = ""


@dataclass
class CaptioningOptions(CaptionerOptions):
    embedding: str = choice("image", "image", "text")  # what the mapper trains on: image (ClipCap) | text (CapDec)
    noise_variance: float = nonneg(0.0)  # Gaussian noise on the training embedding (normalised); CapDec: 0.016
    reference_loss_quirks: bool = False  # the reference's CE: BOS target, no eos, its pad handling (see above)


@dataclass
class CapDecOptions(CaptioningOptions):
    embedding: str = choice("text", "image", "text")
    noise_variance: float = nonneg(CAPDEC_NOISE_VARIANCE)


class CaptionerMethod(Method):
    """A frozen CLIP + a captioner whose mapper alone is trainable (training here, test-time tuning in RLCF).

    ``encode_text`` keeps CLIP's tokenizer; ``caption`` decodes a batch of images with ``final_beams`` beams.
    """

    Options = CaptionerOptions

    def __init__(self, backbone: Backbone, options: Any = None, captioner: Captioner | None = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if captioner is None:
            captioner = build_captioner(
                o.lm, backbone.embed_dim, o.mapper, o.prefix_length, o.clip_length, o.mapper_layers, o.mapper_heads,
                o.tokenizer, _DTYPES[o.lm_dtype], o.normalize_input,
            )  # fmt: skip
        if captioner.prefix_length != o.prefix_length:
            raise ConfigError(
                f"the captioner's prefix has {captioner.prefix_length} tokens, options say {o.prefix_length}"
            )
        self.captioner = captioner
        if o.mapper_weights:
            self.load_mapper_weights(o.mapper_weights)

    def load_mapper_weights(self, source: str) -> None:
        """Load a mapper saved by vlprompt (a shipped world mapper's name or its file), shapes checked."""
        state, shape = load_mapper_weights(source)
        mapper = self.captioner.mapper
        reference = next(mapper.parameters())
        try:
            mapper.load_state_dict({k: v.to(reference.dtype) for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"mapper weights {source!r} were saved from a mapper of shape {shape}; they do not fit this "
                f"captioner's options (method.mapper, prefix_length, clip_length, mapper_layers, mapper_heads, the "
                f"backbone's embedding width): {str(err).splitlines()[0]}"
            ) from None

    def encode_text(self, texts: Sequence[str] | Tensor, plans: Any = None) -> Tensor:
        """L2-normalised CLIP text embeddings (CLIP's tokenizer, whatever ``tokenize`` returns here)."""
        tokens = texts if isinstance(texts, Tensor) else self.backbone.tokenize(list(texts))
        return F.normalize(self.backbone.encode_text(tokens.to(self.backbone.logit_scale.device)), dim=-1)

    @torch.no_grad()
    def clip_embedding(self, images: Tensor) -> Tensor:
        """The frozen CLIP's image embeddings ``[B, D]`` (the captioner normalises them when configured)."""
        return self.backbone.encode_image(images).float()

    @torch.no_grad()
    def caption(self, images: Tensor, beams: int | None = None) -> list[str]:
        """One caption per image of the batch, by beam search with ``final_beams`` beams."""
        prefix = self.captioner.prefix(self.clip_embedding(images))
        beams = beams or self.options.final_beams
        return [c[0] for c in self.captioner.generate(prefix, beams, 1, self.options.max_new_tokens)]

    def import_reference(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """A ClipCap / CapDec / RLCF checkpoint's mapper tensors under our names."""
        return {f"captioner.mapper.{k}": v for k, v in mapper_state_from_reference(state_dict).items()}

    def load_mapper(self, path: str) -> None:
        """Load a public mapper checkpoint (``.pt``, tensors only) into the mapper, shapes checked."""
        state = load_mapper_checkpoint(path)
        try:
            self.captioner.mapper.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"{path}: the mapper tensors do not fit this captioner's options ({err})") from None


@register_method("clipcap")
class Captioning(CaptionerMethod):
    """Mapper training: ClipCap on image embeddings, or (``embedding: text``) CapDec's text-only recipe.

    ``tokenize`` gives what ``forward`` needs for a training batch: the captions' teacher-forcing layout, and the
    CLIP text tokens when the mapper trains on text.
    """

    Options = CaptioningOptions

    def __init__(self, backbone: Backbone, options: Any = None, captioner: Captioner | None = None) -> None:
        super().__init__(backbone, options, captioner)
        self.generator: torch.Generator | None = None  # CapDec's noise; None = torch's global RNG (seeded runs)

    @property
    def text_only(self) -> bool:
        return self.options.embedding == "text"

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        o = self.options
        batch = {"forcing": teacher_forcing(self.captioner.tokenizer, texts, o.reference_loss_quirks, training=True)}
        if self.text_only:
            batch["clip_tokens"] = self.backbone.tokenize(list(texts))
        return batch

    def forward(self, visual: Tensor, tokens: dict[str, Any], mask: Tensor | None = None) -> Tensor:
        """Teacher-forced CE of a batch of (image, caption) pairs; text-only training ignores the images."""
        if self.text_only:
            with torch.no_grad():
                emb = self.encode_text(tokens["clip_tokens"])
        else:
            emb = self.clip_embedding(visual)
        return self.embedding_loss(emb, tokens["forcing"])

    def embedding_loss(self, emb: Tensor, forcing: TeacherForcing) -> Tensor:
        """The training loss from the frozen CLIP's embeddings ``[N, D]`` of the batch (CapDec's noise added here):
        what :meth:`forward` computes after encoding, for recipes that encode once and reuse the embeddings."""
        if self.options.noise_variance > 0:  # CapDec's, on whichever embedding trains
            emb = noisy_embedding(emb, self.options.noise_variance, self.generator)
        return caption_losses(self.captioner, self.captioner.prefix(emb), forcing).mean()


@register_method("capdec")
class CapDec(Captioning):
    """CapDec: ClipCap trained on noisy CLIP text embeddings only."""

    Options = CapDecOptions
