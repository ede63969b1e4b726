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

**Interaction** (LPI and DCP): a per-task :class:`~vlprompt.prompts.lpi.LowRankInteraction` mixes the N prompt
tokens of both towers of the same image-expression pair before blocks ``1..interact_depth-1``
(:func:`prompt_interaction`, the one home of that coupling); a method that sets ``self.interactions`` gets it.
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
from vlprompt.prompts.lpi import LowRankInteraction


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


def interaction_modules(backbone: Backbone, num_tasks: int, rank: int, mix: float) -> nn.ModuleList:
    """One :class:`~vlprompt.prompts.lpi.LowRankInteraction` per task, its CP maps spanning every tower layer
    (the spec's CLIP port of LPI's ``InteractModule``: ``[L_towers, Dv + 1, Dt]`` and ``[L_towers, Dt + 1, Dv]``)."""
    towers = min(backbone.vision.num_layers, backbone.text.num_layers)
    dv, dt = backbone.vision_width, backbone.text_width
    return nn.ModuleList(LowRankInteraction(towers, dv, dt, rank, mix) for _ in range(num_tasks))


def prompt_interaction(module: nn.Module, n_tokens: int, depth: int) -> Between | None:
    """The per-layer coupling of one task's interaction ``module``: before each block ``1 <= l < depth`` the tokens
    at positions ``1..N`` of both towers (the prompt tokens :func:`grounding_plans` inserts after the first token)
    are replaced by ``module(l, v, t)``; block 0 (prompts just inserted) and blocks from ``depth`` on pass through.
    None when ``depth < 2`` (no block to couple)."""
    if depth < 2:
        return None

    def between(layer: int, xv: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        if not 1 <= layer < depth:
            return xv, xt
        dtype = next(module.parameters()).dtype  # a reduced-precision tower (bf16) meets a float32 module
        v, t = module(layer, xv[:, 1 : 1 + n_tokens].to(dtype), xt[:, 1 : 1 + n_tokens].to(dtype))
        return _write(xv, v), _write(xt, t)

    return between


def _write(x: Tensor, tokens: Tensor) -> Tensor:
    """``x`` with positions ``1..N`` replaced by ``tokens [B, N, D]`` (out of place: autograd sees both)."""
    return torch.cat([x[:, :1], tokens.to(x.dtype), x[:, 1 + tokens.shape[1] :]], dim=1)


class TaskGroundingMethod(GroundingMethod, ContinualMethod):
    """Per-task prompts for REC (see the module docstring). Subclasses fill ``self.prompts`` (an ``nn.ModuleList``
    over tasks whose modules return ``(P_v, P_t)``) and, for LPI's per-layer coupling, ``self.interactions``
    (:func:`interaction_modules`), applied before blocks ``1..interact_depth-1``."""

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
        self.interactions: nn.ModuleList | None = None  # per-task interaction modules, set by methods with one

    @property
    def interact_depth(self) -> int:
        """The interaction runs before blocks ``1..interact_depth-1``: LPI's ``INTERACT_DEPTH`` = its prompt depth."""
        return self.depth

    def begin_task(self, task: int) -> None:
        ContinualMethod.begin_task(self, task)
        for t, module in enumerate(self.task_modules()):
            module.requires_grad_(t == task)

    def task_modules(self) -> list[nn.Module]:
        """What task ``t`` trains, indexed by task: its prompts and, where the method has them, its interaction."""
        if self.interactions is None:
            return list(self.prompts)
        return [nn.ModuleList([p, i]) for p, i in zip(self.prompts, self.interactions)]

    def task_prompts(self, task: int) -> tuple[Tensor, Tensor]:
        """``(P_v, P_t)`` of task ``task``."""
        return self.prompts[task]()

    def task_plans(self, task: int) -> Plans:
        return grounding_plans(*self.task_prompts(task), self.depth, self.options.insert_before_ln_pre, self.deep_mode)

    def plans(self) -> Plans:
        return self.task_plans(self.current_task)

    def interaction(self, task: int) -> Between | None:
        """Task ``task``'s per-layer coupling of the towers (None: no interaction modules, the towers run apart)."""
        if self.interactions is None:
            return None
        return prompt_interaction(self.interactions[task], self.options.n_tokens, self.interact_depth)

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
