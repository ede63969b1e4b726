"""IT-Prompt (Jiao, Cao, Wang; ACM MM Asia 2024): task prompts guided by fixed class-text anchors, on frozen CLIP.

What is known (spec ``itprompt_rvlr.md`` A1, A3): CLIP stays frozen; each task has its own discrete image prompt
with a key; a task predictor on frozen image features selects the prompt ("prompt selection"); the frozen text
encoder's embeddings of hand-written templates ("a photo of a {class}") guide the prompted image feature ("Text
guide"), keeping each task's prompt distinct. Everything else is inferred ([INF] in the spec) and is an option here,
with HiDe's parts (:class:`~vlprompt.methods.hide.HiDePrompt`: TII, prompt momentum, contrastive regulariser, TAP)
as the base, as spec A9 reads the figure:

* loss ``CE(W z; task-t classes) + text_weight * L_text (+ key_weight (1 - cos(q, k_t))) (+ reg * HiDe's term)`` with
  ``L_text = CE(s [cos(z, w_c)]_{c in C_t}, y)`` (``text_loss: ce``) or ``1 - cos(z, w_y)`` (``text_loss: cosine``);
  ``s`` = CLIP's logit scale unless ``text_scale`` is set; ``text_classes: seen`` widens the softmax to every seen
  class;
* prompts: prefixes in ``layers`` 0-4 with 8 tokens split 4 keys + 4 values (``length: 4``, the VQ-Prompt/CODA
  convention), one per task; the figure's keys are kept per task but only act through the optional pull loss;
* inference: TII -> task -> ``z`` under that task's prompt -> the classifier over all seen classes, optionally plus
  ``infer_text_weight * s cos(z, w_c)``; ``classifier: ncm`` is the journal's C-NCM instead (nearest stored k-means
  centroid of ``z``, features already L2-normalised; no gradient-trained classifier, no TAP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone import Backbone
from vlprompt.methods.base import register_method
from vlprompt.methods.cil import check_choices, scalar
from vlprompt.methods.hide import HiDeOptions, HiDePrompt
from vlprompt.options import count, nonneg, ranged


@dataclass
class ITPromptOptions(HiDeOptions):
    layers: list[int] = ranged(factory=lambda: [0, 1, 2, 3, 4], ge=0)  # [INF] VQ-Prompt/CODA: layers 0-4
    length: int = count(4)  # [INF] Lp = 8 = 4 key + 4 value tokens
    text_weight: float = nonneg(1.0)  # beta of the text-guidance term [INF]
    text_loss: str = "ce"  # ce (softmax over text anchors) | cosine (1 - cos(z, w_y)) [INF]
    text_classes: str = "task"  # classes in the text softmax: task (C_t) | seen [INF]
    text_scale: float = nonneg(0.0)  # s of the text softmax; 0 = CLIP's logit scale [INF]
    key_weight: float = nonneg(0.0)  # gamma of the optional DualPrompt-style pull 1 - cos(q, k_t) [INF]
    infer_text_weight: float = nonneg(0.0)  # lambda: add lambda * s * cos(z, w_c) to the test logits [INF]
    classifier: str = "head"  # head (linear + TAP, the ACM paper's figure) | ncm (the journal's C-NCM) [INF]


@register_method("itprompt")
class ITPrompt(HiDePrompt):
    """HiDe-style task prompts + TII, with fixed class-text anchors guiding the prompted image feature."""

    Options = ITPromptOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        check_choices(
            o, {"text_loss": ("ce", "cosine"), "text_classes": ("task", "seen"), "classifier": ("head", "ncm")}
        )
        if o.classifier == "ncm":  # C-NCM: no trained classifier; the training CE runs on the text anchors
            o.head, o.tap = "text", False

    def key_dim(self) -> int:
        return self.query_dim if self.options.key_weight > 0 else 0

    @property
    def text_scale(self) -> Tensor:
        s = self.options.text_scale
        return self.backbone.logit_scale if s <= 0 else torch.tensor(s, device=self.backbone.device)

    def text_guidance(self, z: Tensor, labels: Tensor) -> Tensor:
        """The text-guide term: pulls each prompted feature towards its own class's fixed text anchor."""
        if self.options.text_loss == "cosine":
            return (1.0 - (z * self.text_anchors[labels]).sum(-1)).mean()
        t = self.current_task
        keep = self.task_slice(t) if self.options.text_classes == "task" else slice(0, self.seen_classes(t))
        logits = self.text_scale * z @ self.text_anchors[keep].T
        return F.cross_entropy(logits, labels - keep.start)

    def guidance(self, z: Tensor, labels: Tensor, query: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The text guide (and the optional key pull) on the prompted features of the current task."""
        o, loss, terms = self.options, torch.zeros((), device=z.device), {}
        if o.text_weight > 0:
            text = self.text_guidance(z, labels)
            loss, terms["text"] = loss + o.text_weight * text, scalar(text)
        if o.key_weight > 0:
            key = self.prompts.keys[self.current_task]
            pull = (1.0 - F.cosine_similarity(query.to(key), key[None], dim=-1)).mean()
            loss, terms["pull"] = loss + o.key_weight * pull, scalar(pull)
        return loss, terms

    def eval_logits(self, z: Tensor) -> Tensor:
        """The classifier (+ lambda s cos(z, w_c)), or C-NCM: minus the squared distance to the nearest centroid."""
        if self.options.classifier == "ncm":
            stats = self.feature_stats
            dist = ((z[:, None, None, :] - stats.means[None]) ** 2).sum(-1)  # [B, C, K]
            dist = dist.masked_fill(stats.counts[None] == 0, float("inf"))
            return -dist.min(dim=-1).values
        logits = self.classify(z)
        if self.options.infer_text_weight > 0:
            logits = logits + self.options.infer_text_weight * self.text_scale * z @ self.text_anchors.T
        return logits
