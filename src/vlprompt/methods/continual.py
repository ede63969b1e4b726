"""Task-aware methods for continual runs: the hooks the continual runner calls, and per-task prompts with routing.

The runner (``vlprompt.runners.continual``) drives any :class:`~vlprompt.methods.base.Method`; a plain method is
simply trained on every task in turn (sequential fine-tuning). A :class:`ContinualMethod` additionally learns
which task is current (``begin_task``), may fit routing keys after a task (``fit_keys``) and encodes evaluation
inputs per sample (``encode_images_eval`` / ``encode_texts_eval``), e.g. with the prompts of a routed task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Method, Plans
from vlprompt.methods.routing import KMeansRouter


def prompt_pair_plans(pv: Tensor, pt: Tensor, depth: int = 1, before_ln_pre: bool = True) -> Plans:
    """S-Prompts/LPI entry: slice 0 inserted after CLS (before ``ln_pre`` as LPI, or after it as VPT; no positional
    embedding) and replacing the text placeholders; slices ``1..depth-1`` added to the same positions."""
    deep = range(1, depth)
    vision = PromptPlan(insert=pv[0], add={i: pv[i] for i in deep}, insert_before_ln_pre=before_ln_pre)
    text = PromptPlan(replace={0: pt[0]}, add={i: pt[i] for i in deep})
    return Plans(image=vision, text=text)


class ContinualMethod(Method):
    """A method that knows the task sequence. Subclasses set ``num_tasks`` and may override the hooks."""

    #: True when the method fits routing keys after each task (the runner then passes frozen features).
    uses_keys: bool = False

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        self.num_tasks = max(1, int(getattr(self.options, "num_tasks", 0) or 0))
        self.current_task = 0
        # Related-task matrix [T, T] (1 = related, diagonal 1); set by the runner from the task sequence.
        self.task_relation: Tensor | None = None

    def begin_task(self, task: int) -> None:
        """Called before training task ``task`` (and when resuming after it)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} is outside 0..{self.num_tasks - 1} (method built for {self.num_tasks})")
        self.current_task = task

    def set_task_relation(self, relation: Tensor) -> None:
        """The ``[T, T]`` relation of the task sequence (used by LPI's task-contrast loss)."""
        self.task_relation = torch.as_tensor(relation, dtype=torch.float32)

    # ---- routing keys -----------------------------------------------------------------------
    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """L2-normalised features of the frozen backbone, no prompts (the routing and pool queries)."""
        return F.normalize(self.backbone.encode_image(images.to(self.backbone.device)), dim=-1)

    @torch.no_grad()
    def frozen_text_features(self, captions: Sequence[str]) -> Tensor:
        """L2-normalised frozen text features of plain captions (with the placeholder words in front when the
        method's ``text_keys_with_placeholders`` is set, as LPI's code does)."""
        with_placeholders = getattr(self.options, "text_keys_with_placeholders", False)
        tokens = self.tokenize(captions) if with_placeholders else self.backbone.tokenize(list(captions))
        return F.normalize(self.backbone.encode_text(tokens), dim=-1)

    def fit_keys(self, task: int, image_features: Tensor, text_features: Tensor) -> None:
        """Fit task ``task``'s routing keys from frozen features of its training data (no-op by default)."""

    # ---- evaluation -------------------------------------------------------------------------
    def encode_images_eval(self, images: Tensor, tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(features [B, E], task used per image or None)``; ``tasks`` = oracle task ids, else the method routes."""
        return self.encode_image(images), None

    def encode_texts_eval(self, captions: Sequence[str], tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Text counterpart of :meth:`encode_images_eval`."""
        return self.encode_text(captions), None


class TaskPromptMethod(ContinualMethod):
    """One prompt module per task (S-Prompts, LPI): only the current task's prompts train; evaluation routes
    each image and each caption independently to a task with K-means keys (or uses the oracle task).

    Subclasses fill ``self.prompts`` (an ``nn.ModuleList`` over tasks whose modules return ``(P_v, P_t)`` of
    shapes ``[L, N, Dv]``, ``[L, N, Dt]``) and set ``self.depth``; override :meth:`task_prompts` to transform them.
    """

    uses_keys = True
    prompts: nn.ModuleList
    depth: int = 1

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        keys = int(getattr(self.options, "n_keys", 5))
        self.image_router = KMeansRouter(self.num_tasks, backbone.embed_dim, keys)
        self.text_router = KMeansRouter(self.num_tasks, backbone.embed_dim, keys)

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        for t, module in enumerate(self.prompts):
            module.requires_grad_(t == task)

    def task_prompts(self, task: int) -> tuple[Tensor, Tensor]:
        """``(P_v, P_t)`` of task ``task``."""
        return self.prompts[task]()

    def task_plans(self, task: int) -> Plans:
        """The plans of task ``task``'s prompts."""
        return self.plans_from(*self.task_prompts(task))

    def plans_from(self, pv: Tensor, pt: Tensor) -> Plans:
        """The plans of prompt tensors ``P_v``, ``P_t`` at this method's depth."""
        return prompt_pair_plans(pv, pt, self.depth, getattr(self.options, "insert_before_ln_pre", True))

    def plans(self) -> Plans:
        return self.task_plans(self.current_task)

    def fit_keys(self, task: int, image_features: Tensor, text_features: Tensor) -> None:
        self.image_router.fit_task(task, image_features)
        self.text_router.fit_task(task, text_features)

    def _grouped(self, count: int, tasks: Tensor, encode) -> Tensor:
        out: Tensor | None = None
        for t in tasks.unique().tolist():
            rows = (tasks == t).nonzero().flatten()
            feats = encode(rows, self.task_plans(int(t)))
            out = feats.new_zeros(count, feats.shape[1]) if out is None else out
            out[rows.to(out.device)] = feats
        return out

    def encode_images_eval(self, images: Tensor, tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        images = images.to(self.backbone.device)
        if tasks is None:
            tasks = self.image_router.route(self.frozen_image_features(images), self.current_task + 1)
        tasks = tasks.to(images.device)
        return self._grouped(len(images), tasks, lambda rows, plans: self.encode_image(images[rows], plans)), tasks

    def encode_texts_eval(self, captions: Sequence[str], tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        tokens = self.tokenize(captions)
        if tasks is None:
            tasks = self.text_router.route(self.frozen_text_features(captions), self.current_task + 1)
        tasks = tasks.to(tokens.device)
        return self._grouped(len(captions), tasks, lambda rows, plans: self.encode_text(tokens[rows], plans)), tasks
