"""The method interface: which prompts, how they enter the backbone, the loss and the inference rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.errors import ConfigError
from vlprompt.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (what configs refer to)."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco


@dataclass
class MethodOptions:
    """Options every method accepts (subclasses add their own fields)."""


@dataclass
class Plans:
    """The prompt plans of one forward pass; computed once per step and shared by all samples."""

    image: PromptPlan | None = None
    text: PromptPlan | None = None


class Method(nn.Module):
    """Base class of retrieval methods on a CLIP backbone.

    Subclasses set ``Options`` (a dataclass), build their prompt modules in ``__init__`` and override
    :meth:`plans`. The backbone is frozen here; a subclass unfreezes what it trains.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = MethodOptions
    #: Placeholder words put before each caption; their positions receive learned context (CoOp style).
    placeholder: ClassVar[str] = "X"

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__()
        self.backbone = backbone.freeze()
        self.options = options if options is not None else self.Options()
        self.n_placeholders = 0
        self.caption_suffix = ""  # appended to every text (LPI's code, its S-Prompts included, adds ".")
        self.max_words = 0  # 0 = the model's context length; set from data.max_words (DGL uses 32)
        self.loss_fn = ClipLoss()

    # ---- prompts ------------------------------------------------------------------------------
    def plans(self) -> Plans:
        """Prompt plans for the current parameters (none for zero-shot)."""
        return Plans()

    # ---- encoding ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids, with placeholder words in front when the method learns text context (and its suffix)."""
        if self.n_placeholders:
            prefix = " ".join([self.placeholder] * self.n_placeholders) + " "
            texts = [prefix + t for t in texts]
        if self.caption_suffix:
            texts = [t + self.caption_suffix for t in texts]
        return self.backbone.tokenize(list(texts), self.max_words or None)

    def encode_image(self, images: Tensor, plans: Plans | None = None) -> Tensor:
        """L2-normalised image embeddings ``[B, E]``."""
        plans = plans if plans is not None else self.plans()
        return F.normalize(self.backbone.encode_image(images, plans.image), dim=-1)

    def encode_video(self, frames: Tensor, mask: Tensor | None = None, plans: Plans | None = None) -> Tensor:
        """L2-normalised video embeddings ``[B, E]`` of frames ``[B, T, 3, H, W]``.

        Default: CLIP4Clip's meanP, the mean of L2-normalised frame embeddings over the valid frames (``mask``).
        """
        plans = plans if plans is not None else self.plans()
        frame_feats = F.normalize(self.backbone.vision(frames, plans.image).pooled, dim=-1)
        if mask is None:
            return F.normalize(frame_feats.mean(dim=1), dim=-1)
        weights = mask.to(frame_feats.dtype).unsqueeze(-1)
        return F.normalize((frame_feats * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)

    def encode_visual(self, visual: Tensor, mask: Tensor | None = None, plans: Plans | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` (with their frame mask)."""
        if visual.dim() == 5:
            return self.encode_video(visual, mask, plans)
        return self.encode_image(visual, plans)

    def encode_text(self, texts: Sequence[str] | Tensor, plans: Plans | None = None) -> Tensor:
        """L2-normalised text embeddings ``[N, E]`` of strings or already-tokenized ids."""
        plans = plans if plans is not None else self.plans()
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        return F.normalize(self.backbone.encode_text(tokens, plans.text), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        """Similarity scale used by the loss (CLIP's own, frozen unless the method trains it)."""
        return self.backbone.logit_scale

    # ---- training ----------------------------------------------------------------------------
    def forward(self, visual: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Symmetric InfoNCE loss of a batch of matched (image or video, caption) pairs."""
        plans = self.plans()
        vis = self.encode_visual(visual, mask, plans)
        txt = self.encode_text(tokens, plans)
        return self.loss_fn(vis, txt, self.logit_scale)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trained tensors (what checkpoints hold)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.state_dict().items() if n in names}

    def import_reference(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """The trainable tensors of the method's original code's checkpoint under our names (if it has one)."""
        raise NotImplementedError(f"method {self.name!r} does not read reference checkpoints")

    def parameter_counts(self) -> dict[str, int]:
        """``{"trainable": N, "total": M}`` (the frozen backbone included in the total)."""
        unique = {id(p): p for p in self.parameters()}.values()
        return {
            "trainable": sum(p.numel() for p in unique if p.requires_grad),
            "total": sum(p.numel() for p in unique),
        }

    def word_embeddings(self, words: str, n: int) -> Tensor:
        """Embeddings of the first ``n`` word tokens of ``words`` (CoOp's context init).

        The words start at the text tower's first position (behind the start token, where the tokenizer has one)
        and end at the first token equal to the one an empty text has there (end-of-text or padding); not at the
        tower's pooled position: a last-token-pooled tower pools padding.
        """
        first = self.backbone.text.first_position
        tokens = self.backbone.tokenize([words])[0]
        end_token = self.backbone.tokenize([""])[0, first]
        ends = (tokens[first:] == end_token).nonzero()
        n_words = int(ends[0]) if len(ends) else len(tokens) - first
        if n_words < n:
            raise ConfigError(
                f"ctx_init {words!r} has {n_words} word tokens, fewer than n_ctx={n}: give a longer method.ctx_init, "
                "or method.ctx_init='' for a random context"
            )
        with torch.no_grad():
            return self.backbone.text.token_embedding(tokens[first : first + n]).float()
