"""LPI: Low-rank Prompt Interaction for continual vision-language retrieval (ACM MM 2024; Kelvin-ywc/LPI).

Per task one :class:`~vlprompt.prompts.lpi.DecomposedPrompt` (CP rank ``r``, layer factor shared by the two
modalities). Slice 0 enters like S-Prompts (vision: inserted after CLS before ``ln_pre``, no positional embedding;
text: replaces the ``N`` placeholder words of LPI's string ``"X X ... X " + caption + "."``, the "." being
``caption_suffix``); with ``depth > 1`` slices ``1..depth-1`` are added to the same positions before blocks
``1..depth-1``. The release's deep path is dead code, so ``depth=1`` reproduces it, 3 is
its README's setting and 9 the grounding/paper-like one. Loss (spec section 3):
``L_clip + 0.1·L_align + 0.1·L_task`` (``L_task`` from the second task on). Evaluation routes images and captions
independently with K-means keys (S-Prompts). ``interact=True`` adds the per-task low-rank interaction
("paper mode", see :class:`~vlprompt.prompts.lpi.LowRankInteraction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.methods.base import register_method
from vlprompt.methods.continual import TaskPromptMethod
from vlprompt.options import count, nonneg, positive
from vlprompt.prompts.lpi import DecomposedPrompt, LowRankInteraction


@dataclass
class LPIOptions:
    num_tasks: int = nonneg(0)  # set from the task sequence by the continual runner (0 = 1 task when built alone)
    n_tokens: int = count(16)  # N prompt tokens = placeholder words before each caption
    layers: int = count(9)  # L, layer slices of the prompt tensor (hard-coded 9 in LPI)
    rank: int = count(4)
    depth: int = count(1)  # layers that receive prompts: 1 = release, 3 = README, 9 = grounding / paper-like
    insert_before_ln_pre: bool = True  # vision prompts enter before ln_pre (LPI's code); False = after (VPT)
    init_std: float = nonneg(0.5)
    align_weight: float = nonneg(0.1)
    align_temperature: float = positive(0.01)  # retrieval: mean_d(P)/0.01, unnormalised; grounding: normalised, /0.01
    align_normalize: bool = False
    task_weight: float = nonneg(0.1)
    task_temperature: float = positive(0.001)  # retrieval 0.001, grounding 0.01
    double_sigmoid: bool = False  # the reference's BCE-with-logits applied to sigmoid outputs (for fidelity only)
    interact: bool = False  # paper mode: per-task low-rank interaction of the deep prompts
    interact_rank: int = count(4)
    n_keys: int = count(5)  # K-means keys per task per modality
    text_keys_with_placeholders: bool = False  # True: keys from the "X X ... caption" string, as LPI's code
    caption_suffix: str = "."  # appended to every caption: LPI encodes "X X ... X " + caption + "."


def layer_alignment_loss(pv: Tensor, pt: Tensor, temperature: float = 0.01, normalize: bool = False) -> Tensor:
    """LPI's layer alignment: layer ``l``'s visual prompt must match layer ``l``'s textual prompt.

    ``u = mean_d(P_v)``, ``w = mean_d(P_t)`` ``[L, N]``; logits ``(u/τ)(w/τ)ᵀ`` (retrieval, unnormalised) or
    ``û ŵᵀ/τ`` with L2-normalised rows (grounding); symmetric cross-entropy against the identity.
    """
    u, w = pv.mean(dim=-1), pt.mean(dim=-1)
    if normalize:
        logits = F.normalize(u, dim=-1) @ F.normalize(w, dim=-1).T / temperature
    else:
        logits = (u / temperature) @ (w / temperature).T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def task_contrast_loss(
    x: Tensor, relation: Tensor, temperature: float = 0.001, double_sigmoid: bool = False
) -> Tensor:
    """LPI's inter-task contrast on flattened prompts ``x [T, F]`` with a binary relation ``[T, T]``.

    ``C`` = pairwise cosine, ``p = σ(C/τ)`` with the diagonal at 1; per row, the mean binary cross-entropy over
    related tasks plus the mean over unrelated ones; averaged over rows. The reference feeds ``p`` to
    BCE-with-logits, i.e. applies the sigmoid twice (``double_sigmoid=True``); the default is the intended single
    one. A row without unrelated tasks (NaN in the reference) contributes its related part only.
    """
    c = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    target = relation.to(x).clone().fill_diagonal_(1.0)
    if double_sigmoid:
        probs = torch.sigmoid(c / temperature).masked_fill(eye, 1.0)
        loss = F.binary_cross_entropy_with_logits(probs, target, reduction="none")
    else:  # a large finite logit on the diagonal: p = 1 there without inf - inf in the loss
        loss = F.binary_cross_entropy_with_logits((c / temperature).masked_fill(eye, 1e4), target, reduction="none")
    pos, neg = target > 0.5, target <= 0.5
    pos_mean = (loss * pos).sum(1) / pos.sum(1)
    neg_mean = (loss * neg).sum(1) / neg.sum(1).clamp(min=1)
    return (pos_mean + neg_mean).mean()


def prompt_task_loss(
    prompts: nn.ModuleList,
    task: int,
    pv: Tensor,
    pt: Tensor,
    relation: Tensor | None,
    temperature: float,
    double_sigmoid: bool = False,
) -> Tensor:
    """LPI's ``L_task`` for task ``task`` whose prompts are ``(pv, pt)``: :func:`task_contrast_loss` over the
    flattened prompts of tasks ``0..task`` (earlier ones detached, so the gradient reaches task ``task`` only), the
    mean of the vision and text terms. ``relation`` ``[T, T]``: related tasks (None: every other task unrelated)."""
    if relation is None:
        relation = torch.eye(len(prompts))
    earlier = [prompts[t]() for t in range(task)]
    xv = torch.stack([p[0].detach().flatten() for p in earlier] + [pv.flatten()])
    xt = torch.stack([p[1].detach().flatten() for p in earlier] + [pt.flatten()])
    rel = relation[: task + 1, : task + 1].to(xv.device)
    return 0.5 * (
        task_contrast_loss(xv, rel, temperature, double_sigmoid)
        + task_contrast_loss(xt, rel, temperature, double_sigmoid)
    )


@register_method("lpi")
class LPI(TaskPromptMethod):
    """Per-task decomposed prompts, layer-alignment and task-contrast losses, K-means routing at test time."""

    Options = LPIOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        towers = min(backbone.vision.num_layers, backbone.text.num_layers)
        if not 1 <= o.depth <= min(o.layers, towers):
            raise ValueError(f"lpi.depth must be in 1..min(layers={o.layers}, tower depth={towers}), got {o.depth}")
        if o.interact and o.depth < 2:
            raise ValueError("lpi.interact mixes the deep prompts of layers 1..depth-1: it needs depth >= 2")
        dv, dt = backbone.vision_width, backbone.text_width
        self.prompts = nn.ModuleList(
            DecomposedPrompt(o.layers, o.n_tokens, dv, dt, o.rank, o.init_std) for _ in range(self.num_tasks)
        )
        self.interactions = (
            nn.ModuleList(LowRankInteraction(o.layers, dv, dt, o.interact_rank) for _ in range(self.num_tasks))
            if o.interact
            else None
        )
        self.depth = o.depth
        self.n_placeholders = o.n_tokens
        self.caption_suffix = o.caption_suffix  # "X" * N + " " + caption + "." (routing keys included)
        self.loss_terms: dict[str, float] = {}
        self.begin_task(0)

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        if self.interactions is not None:
            for t, module in enumerate(self.interactions):
                module.requires_grad_(t == task)

    def task_prompts(self, task: int) -> tuple[Tensor, Tensor]:
        pv, pt = self.prompts[task]()
        return self._interact(task, pv, pt)

    def _interact(self, task: int, pv: Tensor, pt: Tensor) -> tuple[Tensor, Tensor]:
        if self.interactions is None:
            return pv, pt
        vs, ts = [pv[0]], [pt[0]]
        for layer in range(1, self.depth):
            v, t = self.interactions[task](layer, pv[layer], pt[layer])
            vs.append(v)
            ts.append(t)
        return torch.stack(vs), torch.stack(ts)

    def forward(self, visual: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """CLIP loss under the current task's prompts plus the alignment and task-contrast terms."""
        o, task = self.options, self.current_task
        pv, pt = self.prompts[task]()
        plans = self.plans_from(*self._interact(task, pv, pt))
        vis = self.encode_visual(visual, mask, plans)
        txt = self.encode_text(tokens, plans)
        clip = self.loss_fn(vis, txt, self.logit_scale)
        loss, terms = clip, {"clip": clip.item()}
        if o.align_weight:
            align = layer_alignment_loss(pv, pt, o.align_temperature, o.align_normalize)
            loss, terms["align"] = loss + o.align_weight * align, align.item()
        if o.task_weight and task > 0:
            tc = prompt_task_loss(self.prompts, task, pv, pt, self.task_relation, o.task_temperature, o.double_sigmoid)
            loss, terms["task"] = loss + o.task_weight * tc, tc.item()
        self.loss_terms = terms
        return loss
