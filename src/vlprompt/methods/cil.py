"""Shared base of class-incremental classification methods on a frozen CLIP image tower.

Protocol (rehearsal-free class-incremental learning): task ``t`` brings new classes, disjoint from earlier tasks';
no exemplar of an earlier task is kept; at test time the task is unknown and the prediction is an argmax over every
class seen so far. Labels are *positions* in the run's class order (see :mod:`vlprompt.data.cil`): task ``t`` owns
positions ``offsets[t] .. offsets[t+1] - 1``, so the classes seen after task ``t`` are the prefix
``[0, offsets[t+1])``.

A method produces an image feature ``z`` (L2-normalised CLIP embedding, possibly under prefix prompts) and a
classifier turns it into logits over all classes:

* ``head: cosine`` (default) [INF]: learned class vectors ``W_c`` and logits ``s cos(z, W_c)``, ``s`` = CLIP's logit
  scale: the zero-shot classifier's form with learned weights. The references (L2P, DualPrompt, CODA-Prompt, HiDe)
  put ``Linear`` on raw ViT features of norm ~10-30; on CLIP's unit-norm ``z`` such a head learns its scale slowly
  (HiDe's alignment at lr 0.005 barely moves it), so the cosine form is the default for every method here;
* ``head: linear``: ``W z + b`` on the unit-norm ``z``, literally as the references;
* ``head: text``: CLIP's zero-shot classifier ``s cos(z, w_c)`` with the fixed class-text anchors ``w_c``.

Learned heads start as ``nn.Linear`` does (``head_init: default``) or from the class-text anchors (``text``).

Training logits are masked (``train_mask``): ``task`` keeps only the current task's classes (L2P, DualPrompt,
CODA-Prompt and HiDe all train this way), ``seen`` keeps every class seen so far. The class-text anchors ``w_c`` are
computed once by the runner from the frozen text encoder ("a photo of a {class}.") and never require grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Method, register_method
from vlprompt.options import nonneg

#: What ``end_task`` receives: a function returning batches ``(images, labels, queries)`` of the task's training
#: data under the deterministic (evaluation) transform.
TaskBatches = Callable[[], Iterable[tuple[Tensor, Tensor, Tensor]]]


@dataclass
class CILOptions:
    num_tasks: int = nonneg(0)  # set by the runner
    head: str = "cosine"  # cosine: s cos(z, w_c), w_c learned | linear: W z + b | text: fixed anchors (zero-shot)
    head_init: str = "default"  # learned heads: default (nn.Linear init) | text (the class-text anchors) [INF]
    head_scale: float = nonneg(0.0)  # s of the cosine/text heads; 0 = CLIP's logit scale
    train_mask: str = "task"  # training logits: task (the current task's classes) | seen (all seen classes)
    query: str = "cls"  # frozen query: cls (pre-projection CLS after ln_post, as the ViT references) | embedding


#: Allowed values of the string options every class-incremental method has.
CHOICES = {"head": ("cosine", "linear", "text"), "head_init": ("default", "text"), "train_mask": ("task", "seen"),
           "query": ("cls", "embedding")}  # fmt: skip


def check_choices(options: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """A bad string option is an error naming the option and its allowed values."""
    for name, allowed in choices.items():
        value = getattr(options, name)
        if value not in allowed:
            raise ValueError(f"method option {name} must be one of {allowed}, got {value!r}")


def scalar(t: Tensor) -> float:
    """A loss term as a float for logs (detached, so autograd does not warn)."""
    return float(t.detach())


def mask_logits(logits: Tensor, keep: slice | Tensor) -> Tensor:
    """``logits`` with every class outside ``keep`` (a slice of positions or a bool mask) set to ``-inf``."""
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    allowed[keep] = True
    return logits.masked_fill(~allowed, float("-inf"))


class ClassIncrementalMethod(Method):
    """Base class: frozen CLIP, a classifier over all classes, task hooks the class-incremental runner calls."""

    Options = CILOptions
    #: True when the method infers a task id per test sample (the runner then reports task-identity accuracy).
    routes_tasks: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        check_choices(o, CHOICES)
        self.num_tasks = max(1, int(o.num_tasks or 0))
        self.current_task = 0
        self.offsets: list[int] = []
        self.head: nn.Linear | None = None
        self.register_buffer("text_anchors", torch.zeros(0, backbone.embed_dim), persistent=False)
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long), persistent=False)

    # ---- set-up --------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    @property
    def query_dim(self) -> int:
        return self.backbone.vision_width if self.options.query == "cls" else self.backbone.embed_dim

    def setup(self, task_sizes: list[int], anchors: Tensor) -> None:
        """The label space (``task_sizes`` classes per task, in position order) and the frozen class-text anchors
        ``[C, E]``. Called once by the runner before training (and before restoring a checkpoint)."""
        if len(task_sizes) != self.num_tasks:
            raise ValueError(f"the method was built for {self.num_tasks} tasks, the split has {len(task_sizes)}")
        if anchors.shape[0] != sum(task_sizes):
            raise ValueError(f"{anchors.shape[0]} class-text anchors for {sum(task_sizes)} classes")
        device = self.backbone.device
        self.offsets = [0]
        for n in task_sizes:
            self.offsets.append(self.offsets[-1] + int(n))
        self.text_anchors = F.normalize(anchors.detach().float(), dim=-1).to(device)
        self.class_task = torch.repeat_interleave(torch.arange(len(task_sizes)), torch.as_tensor(task_sizes)).to(
            device
        )
        if self.options.head in ("linear", "cosine"):
            self.head = nn.Linear(self.backbone.embed_dim, self.num_classes, bias=self.options.head == "linear")
            self.head.to(device)
            if self.options.head_init == "text":  # start from the zero-shot classifier
                with torch.no_grad():
                    scale = self.backbone.logit_scale if self.options.head == "linear" else 1.0
                    self.head.weight.copy_(self.text_anchors * scale)
                    if self.head.bias is not None:
                        self.head.bias.zero_()
        self.build(task_sizes)

    def build(self, task_sizes: list[int]) -> None:
        """Subclass hook: allocate what depends on the label space (per-class statistics, ...)."""

    def task_slice(self, task: int) -> slice:
        """Positions of task ``task``'s classes."""
        return slice(self.offsets[task], self.offsets[task + 1])

    def seen_classes(self, task: int) -> int:
        """Number of classes seen after training task ``task``."""
        return self.offsets[task + 1]

    # ---- task hooks ----------------------------------------------------------------------------
    def begin_task(self, task: int) -> None:
        """Called before training task ``task``: make current, initialise and unfreeze that task's parameters."""
        self.set_current_task(task)

    def set_current_task(self, task: int) -> None:
        """Make ``task`` current without touching parameters (also used when a run resumes after ``task``)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} is outside 0..{self.num_tasks - 1}")
        self.current_task = task

    def end_task(self, task: int, batches: TaskBatches) -> dict[str, Any]:
        """Called after training task ``task`` (statistics, task-identity heads, alignment); returns facts."""
        return {}

    # ---- features and logits -------------------------------------------------------------------
    @torch.no_grad()
    def query_features(self, images: Tensor) -> Tensor:
        """Frozen, prompt-free query ``[B, Dq]``: pre-projection CLS (``query: cls``) or the CLIP embedding."""
        vision, was_training = self.backbone.vision, self.backbone.training
        self.backbone.eval()  # a query is a fixed function of the image (no dropout even while prompts train)
        out = vision(images.to(self.backbone.device), None, return_tokens=self.options.query == "cls")
        self.backbone.train(was_training)
        if self.options.query == "embedding":
            return out.pooled.float()
        return vision.pool(out.tokens).float()  # ln_post(CLS) for CLIP's token pooling

    def encode_prompted(self, images: Tensor, plan: PromptPlan | None) -> Tensor:
        """L2-normalised CLIP embedding ``z [B, E]`` under a prompt plan (None = frozen CLIP)."""
        return F.normalize(self.backbone.encode_image(images, plan), dim=-1)

    def features(self, images: Tensor, query: Tensor, tasks: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(z [B, E], auxiliary loss)`` for training (``tasks`` = the true task per sample) or evaluation (None)."""
        return self.encode_prompted(images, None), torch.zeros((), device=images.device)

    def classify(self, z: Tensor) -> Tensor:
        """Logits ``[B, C]`` over every class of the run."""
        if self.options.head == "linear":
            return self.head(z)
        weights = self.text_anchors if self.head is None else F.normalize(self.head.weight, dim=-1)
        return self.head_scale * z @ weights.T

    @property
    def head_scale(self) -> Tensor:
        """``s`` of the cosine and text classifiers: ``head_scale`` or CLIP's own logit scale."""
        s = self.options.head_scale
        return self.backbone.logit_scale if s <= 0 else torch.tensor(float(s), device=self.backbone.device)

    def eval_logits(self, z: Tensor) -> Tensor:
        """Test-time logits ``[B, C]`` (the classifier unless a method predicts differently, e.g. C-NCM)."""
        return self.classify(z)

    def train_keep(self) -> slice:
        """Classes the training loss sees for the current task (``train_mask``)."""
        t = self.current_task
        return self.task_slice(t) if self.options.train_mask == "task" else slice(0, self.seen_classes(t))

    def training_loss(self, images: Tensor, labels: Tensor, query: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Masked cross-entropy of the current task (+ the method's auxiliary terms)."""
        tasks = torch.full_like(labels, self.current_task)
        z, aux = self.features(images, query, tasks)
        ce = F.cross_entropy(mask_logits(self.classify(z), self.train_keep()), labels)
        return ce + aux, {"ce": scalar(ce), "aux": scalar(aux)}

    @torch.no_grad()
    def predict(self, images: Tensor, query: Tensor, tasks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(logits over the seen classes [B, seen], task used per sample or None)`` after the current task.

        ``tasks`` = the true tasks (oracle routing), honoured by task-routing methods only.
        """
        z, _ = self.features(images, query, None)
        return self.eval_logits(z)[:, : self.seen_classes(self.current_task)], None

    # ---- parameters ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the per-task optimizer updates (default: every parameter that requires grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def learned_parameters(self) -> list[nn.Parameter]:
        """Everything the current task trains, in any stage (what ``parameter_counts`` calls trainable)."""
        return self.trainable_parameters()

    def parameter_counts(self) -> dict[str, int]:
        """``trainable`` = what one task trains (earlier tasks' prompts are frozen); ``total`` includes CLIP."""
        counts = super().parameter_counts()
        counts["trainable"] = sum(p.numel() for p in {id(p): p for p in self.learned_parameters()}.values())
        return counts


@dataclass
class ZeroShotCILOptions(CILOptions):
    head: str = "text"  # the zero-shot classifier is the point of this method


@register_method("zeroshot_cil")
class ZeroShotCIL(ClassIncrementalMethod):
    """Frozen CLIP with the class-text anchors as classifier over the seen classes: nothing is trained."""

    Options = ZeroShotCILOptions
