"""HiDe-style class-incremental prompting (Wang et al., NeurIPS 2023) on a frozen CLIP image tower.

Hierarchical decomposition, as far as the spec describes it (``itprompt_rvlr.md`` A3, A4, A9):

1. **Task-identity inference (TII)**: an MLP + linear head on the frozen, prompt-free query (see
   :mod:`vlprompt.methods.task_inference`); trained on task ``t``'s real queries (``tii_epochs`` Adam epochs, logits
   masked to ``tii_mask``), then, from task 1 on, re-aligned on Gaussian pseudo-queries of every seen class
   (``align_epochs`` SGD epochs). The predicted class's task selects the prompt at test time.
2. **Within-task prediction (WTP)**: one prefix prompt per task (layers ``layers``, ``length`` key and value tokens);
   during training the *true* task's prompt is used (only it and the classifier train). A new prompt starts from the
   previous task's (``init_from_previous``, HiDe's ``shared_prompt_pool``); after its task it is blended with the
   earlier prompts by ``momentum``. ``reg`` adds HiDe's contrastive regulariser against stored class centroids.
3. **Task-adaptive prediction (TAP)**: after each task, multi-centroid statistics of the prompted features ``z`` of
   its classes are stored; from task 1 on, the linear classifier is re-aligned on pseudo-features of every seen class.

At test time (``predict``): TII gives a task per sample (or the true task: oracle routing), that task's prompt gives
``z``, and the classifier predicts over all seen classes (``predict_within_task`` restricts it to the routed task's
classes instead, so a wrong route is always a wrong answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.methods.base import register_method
from vlprompt.methods.cil import (
    CILOptions,
    ClassIncrementalMethod,
    TaskBatches,
    check_choices,
    mask_logits,
    scalar,
)
from vlprompt.methods.task_inference import (
    ClassStatistics,
    TaskIdentityHead,
    contrastive_regularizer,
    fit_classifier,
    sample_pseudo_features,
)
from vlprompt.options import count, nonneg, positive, ranged, unit
from vlprompt.prompts.dualprompt import TaskPrefixPrompts, prefix_plan


@dataclass
class HiDeOptions(CILOptions):
    layers: list[int] = ranged(factory=lambda: [0, 1, 2, 3, 4], ge=0)  # prefix layers (HiDe: 0-4)
    length: int = count(5)  # prefix tokens per key and per value (HiDe: 5 for CIFAR, 20 for ImageNet-R/CUB)
    init: str = "uniform"  # U(-1, 1), HiDe's initializer
    init_from_previous: bool = True  # a new task's prompt starts as the previous task's (shared_prompt_pool)
    momentum: float = unit(0.01)  # prompt momentum after the task: P_t <- (1-m) P_t + m mean_{j<t} P_j
    reg: float = nonneg(0.1)  # contrastive regularisation weight (HiDe's scripts: 0.1; spec range 0.01-0.5)
    reg_temperature: float = positive(0.8)
    tii_epochs: int = nonneg(20)  # TII stage on real frozen queries (HiDe: 20 epochs, Adam lr 5e-4)
    tii_lr: float = positive(5e-4)
    tii_batch_size: int = count(24)  # HiDe's per-GPU batch
    tii_hidden_mult: int = count(2)  # MLP D -> 2D -> D
    tii_mask: str = "task"  # TII stage logits: task (HiDe's train_mask) | seen (the spec's reading)
    centroids: int = count(10)  # k-means centroids per class (HiDe's multi-centroid, n_centroids=10)
    align_epochs: int = nonneg(30)  # TII and TAP alignment epochs (HiDe's crct_epochs)
    align_lr: float = positive(0.005)  # HiDe's ca_lr (SGD, momentum 0.9, wd 5e-4, cosine)
    align_samples: int = count(24)  # pseudo-features per centroid per epoch (HiDe's TII engine: batch size)
    align_batch_size: int = count(128)
    tap: bool = True  # align the classifier on pseudo-features of the prompted features (from task 1 on)
    predict_within_task: bool = False  # restrict the prediction to the routed task's classes


@register_method("hide_prompt")
class HiDePrompt(ClassIncrementalMethod):
    """Task-indexed prefix prompts chosen by a TII head, with HiDe's momentum, regulariser and alignment."""

    Options = HiDeOptions
    routes_tasks = True

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        depth = backbone.vision.num_layers
        if not o.layers or max(o.layers) >= depth or min(o.layers) < 0:
            raise ValueError(f"prompt layers {list(o.layers)} must lie in 0..{depth - 1} (the image tower's blocks)")
        check_choices(o, {"tii_mask": ("task", "seen")})
        self.prompts = TaskPrefixPrompts(self.num_tasks, len(o.layers), o.length, backbone.vision_width,
                                         self.key_dim(), o.init)  # fmt: skip
        self.tii: TaskIdentityHead | None = None
        self.query_stats: ClassStatistics | None = None
        self.feature_stats: ClassStatistics | None = None

    def key_dim(self) -> int:
        """Per-task keys' dimension (0 = none; IT-Prompt adds keys for its optional pull loss)."""
        return 0

    def build(self, task_sizes: list[int]) -> None:
        o, device, c = self.options, self.backbone.device, self.num_classes
        self.tii = TaskIdentityHead(self.query_dim, c, o.tii_hidden_mult).to(device)
        self.query_stats = ClassStatistics(c, self.query_dim, o.centroids).to(device)
        self.feature_stats = ClassStatistics(c, self.backbone.embed_dim, o.centroids).to(device)

    # ---- task hooks ----------------------------------------------------------------------------
    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        if self.options.init_from_previous:
            self.prompts.copy_previous(task)
        self.prompts.train_only(task)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Stage 2 (WTP): the current task's prompt (and key) and the classifier; TII trains in ``end_task``."""
        t = self.current_task
        params = [self.prompts.prompts[t]] + ([self.prompts.keys[t]] if self.prompts.keys is not None else [])
        return params + (list(self.head.parameters()) if self.head is not None else [])

    def learned_parameters(self) -> list[nn.Parameter]:
        """All stages of one task: its prompt (and key), the classifier and the TII head."""
        return self.trainable_parameters() + (list(self.tii.parameters()) if self.tii is not None else [])

    @torch.no_grad()
    def _collect(self, task: int, batches: TaskBatches) -> tuple[Tensor, Tensor, Tensor]:
        """Frozen queries, labels and prompted features (true task's prompt) of the task's training data."""
        qs, ys, zs = [], [], []
        for images, labels, queries in batches():
            tasks = torch.full_like(labels, task)
            z, _ = self.features(images, queries, tasks)
            qs.append(queries.float().cpu()), ys.append(labels.cpu()), zs.append(z.float().cpu())
        return torch.cat(qs), torch.cat(ys), torch.cat(zs)

    def end_task(self, task: int, batches: TaskBatches) -> dict[str, Any]:
        """Momentum on the new prompt, then TII (real queries + alignment), statistics, and TAP."""
        o = self.options
        self.prompts.blend_with_previous(task, o.momentum)
        was_training = self.training
        self.eval()  # statistics under the deterministic forward
        queries, labels, feats = self._collect(task, batches)
        self.train(was_training)
        seen = self.seen_classes(task)
        generator = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,))))
        info: dict[str, Any] = {}
        keep = self.task_slice(task) if o.tii_mask == "task" else slice(0, seen)
        info["tii_loss"] = fit_classifier(self.tii, list(self.tii.parameters()), lambda e: (queries, labels), keep,
                                          o.tii_epochs, o.tii_lr, o.tii_batch_size, "adam", generator)  # fmt: skip
        self.query_stats.fit(queries, labels, seed=task)
        self.feature_stats.fit(feats, labels, seed=task)
        if task > 0 and o.align_epochs > 0:
            info["tii_align_loss"] = fit_classifier(
                self.tii, list(self.tii.parameters()),
                lambda e: sample_pseudo_features(self.query_stats, seen, o.align_samples, generator),
                slice(0, seen), o.align_epochs, o.align_lr, o.align_batch_size, "sgd", generator,
            )  # fmt: skip
            if o.tap and self.head is not None:
                info["tap_loss"] = fit_classifier(
                    self.classify, list(self.head.parameters()),
                    lambda e: sample_pseudo_features(self.feature_stats, seen, o.align_samples, generator),
                    slice(0, seen), o.align_epochs, o.align_lr, o.align_batch_size, "sgd", generator,
                )  # fmt: skip
        return {k: round(v, 4) for k, v in info.items()}

    # ---- features -----------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, query: Tensor) -> Tensor:
        """TII's task ``[B]`` for frozen queries: the task of the best class among the seen ones."""
        seen = self.seen_classes(self.current_task)
        logits = self.tii(query.to(self.backbone.device))[:, :seen]
        return self.class_task[logits.argmax(dim=-1)]

    def features(self, images: Tensor, query: Tensor, tasks: Tensor | None) -> tuple[Tensor, Tensor]:
        """``z`` under each sample's task prompt (``tasks`` given: true or oracle tasks; None: TII routing)."""
        tasks = self.route(query) if tasks is None else tasks.to(self.backbone.device)
        plan = prefix_plan(self.options.layers, self.prompts.gather(tasks))
        return self.encode_prompted(images, plan), torch.zeros((), device=self.backbone.device)

    def training_loss(self, images: Tensor, labels: Tensor, query: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Masked CE of the true task's prompted features + HiDe's contrastive regulariser (+ :meth:`guidance`)."""
        tasks = torch.full_like(labels, self.current_task)
        z, aux = self.features(images, query, tasks)
        ce = F.cross_entropy(mask_logits(self.classify(z), self.train_keep()), labels)
        loss, terms = ce + aux, {"ce": scalar(ce)}
        if self.options.reg > 0:
            stored = None
            if self.current_task > 0:
                stored, _ = self.feature_stats.centroid_means(self.offsets[self.current_task])
            reg = contrastive_regularizer(z, stored, self.options.reg_temperature)
            loss, terms["reg"] = loss + self.options.reg * reg, scalar(reg)
        extra, more = self.guidance(z, labels, query)
        return loss + extra, {**terms, **more}

    def guidance(self, z: Tensor, labels: Tensor, query: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Subclass hook: further loss terms on the prompted features (none for HiDe)."""
        return torch.zeros((), device=z.device), {}

    @torch.no_grad()
    def predict(self, images: Tensor, query: Tensor, tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits over the seen classes with the routed (or given) task's prompt, and the task used."""
        routed = self.route(query) if tasks is None else tasks.to(self.backbone.device)
        z, _ = self.features(images, query, routed)
        logits = self.eval_logits(z)[:, : self.seen_classes(self.current_task)]
        if self.options.predict_within_task:
            allowed = self.class_task[: logits.shape[1]][None, :] == routed[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits, routed
