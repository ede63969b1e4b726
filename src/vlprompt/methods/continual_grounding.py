"""Continual referring-expression grounding: per-task prompts on the detector, routed by the image at test time.

The base of LPI's grounding benchmark methods (LPI, S-Prompts, MaPLe-style and DCP prompts; spec ``lpi.md`` sections
2.4, 3.4, 5). Task ``t``'s prompts (and interaction module, where the method has one) train in task ``t`` only; at
evaluation each image picks a task by its frozen image features (K-means keys, L1 distance) and that task's prompts
serve both towers and the interaction, as LPI's grounding code does (``getTaskIds`` on the image backbone's features;
the expression does not vote, unlike retrieval where image and caption route apart).

**Where prompts enter** (the CLIP port of GLIP's entry points): prompt slice 0 is *inserted* after the first token of
each tower, vision after CLS (before ``ln_pre`` by default, LPI's retrieval entry) and text after the start token,
without positional embeddings; slices ``1..depth-1`` are added to the same positions before those blocks (or replace
them, MaPLe). GLIP added the text prompts to BERT's first 16 tokens and the visual ones to the top-left Swin tokens;
OWL-ViT's text context holds only 16 tokens, so LPI's 16 placeholder words cannot be used and inserting keeps the
expression whole. The detector drops the inserted vision tokens before its heads. GLIP-only details (re-packing the
prompt for deeper Swin stages, the (W, H) write-back of the interaction) do not apply to a ViT and are not ported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.backbone.detector import Detector, DetectorOutput
from vlprompt.methods.base import Plans
from vlprompt.methods.continual import ContinualMethod
from vlprompt.methods.grounding import Between, GroundingMethod, GroundingOptions
from vlprompt.methods.routing import KMeansRouter
from vlprompt.options import count, nonneg


@dataclass
class TaskGroundingOptions(GroundingOptions):
    num_tasks: int = nonneg(0)  # set from the task sequence by the continual runner (0 = 1 task when built alone)
    n_tokens: int = count(16)  # N prompt tokens per tower
    depth: int = count(1)  # layers that receive prompts (slice 0 inserted, 1..depth-1 added)
    insert_before_ln_pre: bool = True  # vision prompts enter before ln_pre (LPI's entry); False = after (VPT)
    n_keys: int = count(5)  # K-means keys per task (image features)


def grounding_plans(pv: Tensor, pt: Tensor, depth: int, before_ln_pre: bool = True, deep: str = "add") -> Plans:
    """Plans of prompt tensors ``P_v [L, N, Dv]``, ``P_t [L, N, Dt]``: slice 0 inserted after each tower's first
    token, slices ``1..depth-1`` added to (``deep="add"``) or replacing (``"replace"``) those positions."""
    layers = range(1, depth)
    v_deep, t_deep = {i: pv[i] for i in layers}, {i: pt[i] for i in layers}
    if deep == "add":
        return Plans(
            PromptPlan(insert=pv[0], add=v_deep, insert_before_ln_pre=before_ln_pre),
            PromptPlan(insert=pt[0], add=t_deep),
        )
    if deep == "replace":
        return Plans(
            PromptPlan(insert=pv[0], replace=v_deep, insert_before_ln_pre=before_ln_pre),
            PromptPlan(insert=pt[0], replace=t_deep),
        )
    raise ValueError(f"deep prompts are added or replace tokens, got {deep!r}")


class TaskGroundingMethod(GroundingMethod, ContinualMethod):
    """Per-task prompts for REC (see the module docstring). Subclasses fill ``self.prompts`` (an ``nn.ModuleList``
    over tasks whose modules return ``(P_v, P_t)``) and may return a per-layer coupling from :meth:`interaction`."""

    Options = TaskGroundingOptions
    uses_keys = True
    uses_text_keys = False  # routing reads the image only
    prompts: nn.ModuleList
    deep_mode = "add"

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options, detector=detector, train_heads=train_heads)
        o = self.options
        towers = min(backbone.vision.num_layers, backbone.text.num_layers)
        if not 1 <= o.depth <= towers:
            raise ValueError(f"{type(self).__name__}: depth must be in 1..{towers} (the towers' depth), got {o.depth}")
        self.depth = o.depth
        self.image_router = KMeansRouter(self.num_tasks, backbone.embed_dim, o.n_keys)

    def begin_task(self, task: int) -> None:
        ContinualMethod.begin_task(self, task)
        for t, module in enumerate(self.task_modules()):
            module.requires_grad_(t == task)

    def task_modules(self) -> list[nn.Module]:
        """What task ``t`` trains, indexed by task (its prompts; methods with interaction modules add them)."""
        return list(self.prompts)

    def task_prompts(self, task: int) -> tuple[Tensor, Tensor]:
        """``(P_v, P_t)`` of task ``task``."""
        return self.prompts[task]()

    def task_plans(self, task: int) -> Plans:
        return grounding_plans(*self.task_prompts(task), self.depth, self.options.insert_before_ln_pre, self.deep_mode)

    def plans(self) -> Plans:
        return self.task_plans(self.current_task)

    def interaction(self, task: int) -> Between | None:
        """Task ``task``'s per-layer coupling of the towers (None: the towers run apart)."""
        return None

    def ground(
        self, images: Tensor, tokens: Tensor, plans: Plans | None = None, between: Between | None = None
    ) -> DetectorOutput:
        if plans is None and between is None:
            plans, between = self.plans(), self.interaction(self.current_task)
        return super().ground(images, tokens, plans, between)

    # ---- routing -----------------------------------------------------------------------------------------------
    def fit_keys(self, task: int, image_features: Tensor, text_features: Tensor | None = None) -> None:
        """Task ``task``'s K-means keys from frozen image features of its training images."""
        self.image_router.fit_task(task, image_features)

    def route(self, images: Tensor) -> Tensor:
        """The task of each image among the tasks seen so far."""
        return self.image_router.route(self.frozen_image_features(images), self.current_task + 1)

    @torch.no_grad()
    def ground_eval(
        self, images: Tensor, tokens: Tensor, plans: Plans | None = None, tasks: Tensor | None = None
    ) -> tuple[DetectorOutput, Tensor | None]:
        """Each image with its routed (or given, ``tasks``) task's prompts and interaction, grouped by task."""
        if plans is not None:
            return self.ground(images, tokens, plans), None
        images, tokens = images.to(self.backbone.device), tokens.to(self.backbone.device)
        tasks = (self.route(images) if tasks is None else tasks).to(images.device)
        parts: dict[int, tuple[Tensor, DetectorOutput]] = {}
        for t in tasks.unique().tolist():
            rows = (tasks == t).nonzero().flatten()
            parts[t] = rows, self.ground(images[rows], tokens[rows], self.task_plans(t), self.interaction(t))
        logits = _scatter([(r, o.logits) for r, o in parts.values()], len(images))
        boxes = _scatter([(r, o.boxes) for r, o in parts.values()], len(images))
        features = _scatter([(r, o.features) for r, o in parts.values()], len(images))
        queries = _scatter([(r, o.queries) for r, o in parts.values()], len(images))
        return DetectorOutput(logits, boxes, features, queries), tasks


def _scatter(parts: list[tuple[Tensor, Tensor]], n: int) -> Tensor:
    """Rows of several groups back into one ``[n, ...]`` tensor in the original order."""
    first = parts[0][1]
    out = first.new_zeros(n, *first.shape[1:])
    for rows, values in parts:
        out[rows] = values
    return out
