"""The :class:`Backbone`: an open_clip CLIP with promptable towers, its tokenizer and transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.embedded import watch_vocabulary
from vlprompt.backbone.loading import create_clip, hub_offline_mode, hub_offline_reason
from vlprompt.backbone.plan import PromptPlan
from vlprompt.backbone.towers import TextTower, VisionTower
from vlprompt.errors import WeightsUnavailableError


class Backbone(nn.Module):
    """A frozen-by-default CLIP whose towers accept prompt plans.

    ``encode_image`` / ``encode_text`` return unnormalised projected embeddings unless
    ``normalize=True``. Without prompts they match open_clip's own encoders.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., Tensor],
        preprocess_train: Callable | None = None,
        preprocess_val: Callable | None = None,
        name: str = "",
        pretrained: str | None = None,
        first_word: int | None = None,
    ) -> None:
        """``first_word``: where the tokenizer puts a text's first word (read from the tokenizer when None)."""
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        self.name = name
        self.pretrained = pretrained
        self.vision = VisionTower(model.visual)
        self.text = TextTower(model)
        self.text.first_position = first_word_position(tokenizer) if first_word is None else first_word

    # ---- facts about the architecture -------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""
        return int(self.vision.visual.output_dim)

    @property
    def vision_width(self) -> int:
        return self.vision.width

    @property
    def text_width(self) -> int:
        return self.text.width

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def image_size(self) -> int:
        size = self.vision.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def image_mean(self) -> tuple[float, ...]:
        """Normalisation mean of the model's preprocessing (open_clip's preprocess config)."""
        return tuple(getattr(self.vision.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)

    @property
    def image_std(self) -> tuple[float, ...]:
        """Normalisation std of the model's preprocessing."""
        return tuple(getattr(self.vision.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    @property
    def logit_scale(self) -> Tensor:
        """``exp(logit_scale)`` of the model (100 for OpenAI CLIP)."""
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    # ---- encoding ---------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str], max_words: int | None = None) -> Tensor:
        """Token ids ``[N, L]`` on the model's device; ``max_words`` truncates (end-of-text kept) below the context."""
        if isinstance(texts, str):
            texts = [texts]
        if max_words is not None and not 2 < max_words <= self.context_length:
            raise ValueError(f"max_words must be in 3..{self.context_length}, got {max_words}")
        tokens = self.tokenizer(list(texts), context_length=max_words) if max_words else self.tokenizer(list(texts))
        return tokens.to(self.device)

    def encode_image(self, images: Tensor, prompts: PromptPlan | None = None, normalize: bool = False) -> Tensor:
        """Embed images ``[B, 3, H, W]`` (or frames ``[B, T, 3, H, W]``) under an optional prompt plan."""
        out = self.vision(images.to(self.device), prompts).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self, texts: str | Sequence[str] | Tensor, prompts: PromptPlan | None = None, normalize: bool = False
    ) -> Tensor:
        """Embed strings or token ids ``[N, L]`` under an optional prompt plan."""
        tokens = texts.to(self.device) if isinstance(texts, Tensor) else self.tokenize(texts)
        out = self.text(tokens, prompts).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def freeze(self) -> Backbone:
        """Freeze every CLIP weight (the usual starting point of prompt methods)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers."""
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def first_word_position(tokenizer: Callable[..., Tensor]) -> int:
    """Where ``tokenizer`` puts a text's first word: 1 behind a start-of-text token (CLIP's), 0 where there is
    none (SigLIP's). Text prompts (CoOp's context, inserted tokens) go there."""
    empty, word = tokenizer(["", "a"])
    return int((empty != word).nonzero()[0])


def load_backbone(
    name: str = "vlprompt-tiny",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> Backbone:
    """Load an open_clip model as a :class:`Backbone`.

    Args:
        name: open_clip architecture (``ViT-B-32``), ``hf-hub:org/repo``, ``local-dir:/path`` or an embedded
            model (``vlprompt-tiny``, ``vlprompt-small``).
        pretrained: open_clip tag (``openai``, ``laion2b_s34b_b79k``), a checkpoint path, ``world`` for the
            embedded models' weights, or None for random initialisation.
        device: where to put the model.
        precision: open_clip precision (``fp32``, ``bf16``, ``fp16``, ``amp``, ...).
    """
    model, pre_train, pre_val = create_clip(name, pretrained, device=device, precision=precision)
    try:
        with hub_offline_mode(name.startswith("hf-hub:") and hub_offline_reason() is not None):
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # hub tokenizers need their config files, which may not be on this machine
        raise WeightsUnavailableError(f"could not load the tokenizer of {name}: {err}") from err
    first_word = first_word_position(tokenizer)  # before the watch, which would count these texts
    tokenizer = watch_vocabulary(tokenizer, model, name)  # a world-vocabulary model warns on text it cannot read
    return Backbone(model, tokenizer, pre_train, pre_val, name=name, pretrained=pretrained, first_word=first_word)
