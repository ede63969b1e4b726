"""RVLR (Yang, Xi, Zhou, Tang; IEEE TIP 2024) as a loss add-on over any CLIP training method.

The student is the wrapped ``base`` method (full fine-tuning, CoOp, VPT, MaPLe, ...): its prompts, encoders and
inference rule are used unchanged, so RVLR costs nothing at test time. Training replaces the base's loss with
(spec part B8; weights default to the official ``a..g``)::

    L = w_clip L_clip + w_rep_image L_iic + w_rep_text L_ttc + w_kd L_kd (+ w_kd_teachers (L_kdi + L_kdt))

* ``L_clip``: symmetric InfoNCE with image-id soft targets ``Q = M / rowsum(M)``, ``M_ij = [img_i = img_j]``
  (captions of the same image in a batch are all positives), scaled by the base's ``logit_scale``.
* Representation distillation: ``L_iic = H(s u ã^T, Q)``, ``L_ttc = H(s t b̃^T, Q)`` with ``ã = n(G_v a)``,
  ``b̃ = n(G_t b)``: trainable linear maps of the frozen teacher features ``a`` (image) and ``b`` (caption).
* Structure distillation: relation matrices ``R = n(x) n(x)^T / tau2`` over the batch, off-diagonal entries only;
  the target is ``E = lam R^T + (1 - lam) R^V`` of the two teachers' raw features. The student relation is
  ``single_modal`` (``dist(R^{S,img}, E) + dist(R^{S,txt}, E)``, the default) or ``pair`` (``h = n(u + t)``, closest
  to the reference code's fusion-CLS relation). ``L_kdi = dist(R^V, E)``, ``L_kdt = dist(R^T, E)`` are added only
  when ``lam`` is learned; for ``lam`` in [0, 1] their sum is constant, so they act as a soft box on ``lam``.
* ``tau2`` is fixed by default: every relation term scales as 1/tau2, so a learned tau2 drifts upward and
  quietly shrinks the distillation weight (the reference code learns it; ``learn_relation_temperature``).

Distances (honest names for the reference code's ``--distance``): ``mae`` (the only one its scripts use), ``mse``,
``cumsum_mae`` (what the reference calls ``kl``: MAE between cumulative sums of the unsorted flattened
off-diagonal vectors). The reference's ``wd`` mode (trainable teacher MLPs, text-distance weights) is not offered.

Teachers are precomputed, frozen feature caches (:mod:`vlprompt.data.features`), looked up by sample id: the
trainer calls :meth:`RVLR.bind_train_set` once and passes each batch's dataset and image indices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.errors import ConfigError
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.methods.build import build_method, method_section
from vlprompt.options import nonneg, positive, unit

DISTANCES = ("mae", "mse", "cumsum_mae")
STUDENT_RELATIONS = ("single_modal", "pair")


@dataclass
class RVLROptions:
    base: dict[str, Any] = method_section(lambda: {"name": "finetune"})  # the method RVLR trains
    image_teacher: str = ""  # feature cache folder (`vlprompt features extract ... --modality image`)
    text_teacher: str = ""  # feature cache folder (`... --modality text`)
    image_teacher_dim: int = nonneg(0)  # 0 = read from the cache; set both to build without the caches (e.g. to count)
    text_teacher_dim: int = nonneg(0)
    lam: float = unit(0.5)  # lambda: the text teacher's share of the target E (its initial value when learned)
    learn_lambda: bool = True
    clamp_lambda: bool = False  # use clamp(lambda, 0, 1); the reference leaves it free (L_kdi + L_kdt bound it)
    relation_temperature: float = positive(0.07)  # tau2
    learn_relation_temperature: bool = False
    distance: str = "mae"  # mae | mse | cumsum_mae
    student_relation: str = "single_modal"  # single_modal | pair
    soft_targets: bool = True  # captions of the same image are all positives (else: diagonal targets)
    w_clip: float = nonneg(1.0)
    w_rep_image: float = nonneg(1.0)
    w_rep_text: float = nonneg(2.0)
    w_kd: float = nonneg(2.0)
    w_kd_teachers: float = nonneg(1.0)  # weight of L_kdi and of L_kdt (only when lambda is learned)


# ---- losses as functions of the (global) batch -----------------------------------------------------------
def soft_targets(ids: Tensor) -> Tensor:
    """``Q = M / rowsum(M)`` with ``M_ij = [ids_i = ids_j]``."""
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(1, keepdim=True)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-(1/B) sum_ij Q_ij log softmax_j(Z)_ij``."""
    return -(targets * logits.log_softmax(dim=1)).sum(1).mean()


def relation_matrix(x: Tensor, temperature: Tensor | float) -> Tensor:
    """``n(x) n(x)^T / temperature`` (cosine relations of a batch)."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T / temperature


def off_diagonal(r: Tensor) -> Tensor:
    """The ``B(B-1)`` off-diagonal entries of a square matrix, row by row."""
    n = r.shape[0]
    return r[~torch.eye(n, dtype=torch.bool, device=r.device)]


def teacher_mix(r_image: Tensor, r_text: Tensor, lam: Tensor | float) -> Tensor:
    """``E = lam R^T + (1 - lam) R^V``."""
    return lam * r_text + (1 - lam) * r_image


def relation_distance(student: Tensor, target: Tensor, kind: str = "mae") -> Tensor:
    """Distance between two flattened relation vectors (see the module docstring for the names)."""
    if kind == "mae":
        return (student - target).abs().mean()
    if kind == "mse":
        return ((student - target) ** 2).mean()
    if kind == "cumsum_mae":
        return (student.cumsum(0) - target.cumsum(0)).abs().mean()
    raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather over the process group, differentiable (identity without a process group).

    Every rank's gradient reaches every slice, so after DDP's averaging the step equals a single-process step on
    the global batch (as :mod:`vlprompt.core.distributed` does for the CLIP loss). The reference code sends
    gradients into the local slice only, which scales its gradients by 1/world_size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def _cache_dim(folder: str, given: int, what: str) -> int:
    if given:
        return given
    meta = Path(folder) / "meta.json"
    if not folder or not meta.is_file():
        raise ConfigError(
            f"rvlr.{what} {folder!r} is not a feature cache: run `vlprompt features extract CONFIG --modality "
            f"{what.split('_')[0]} --out DIR` and set method.{what}=DIR"
        )
    return int(json.loads(meta.read_text())["dim"])


@register_method("rvlr")
class RVLR(Method):
    """A base CLIP method trained with RVLR's soft-target contrastive loss and two-teacher distillation."""

    Options = RVLROptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if o.distance not in DISTANCES:
            hint = " (the reference's 'kl' is 'cumsum_mae')" if o.distance == "kl" else ""
            raise ConfigError(f"rvlr.distance must be one of {DISTANCES}, got {o.distance!r}{hint}")
        if o.student_relation not in STUDENT_RELATIONS:
            raise ConfigError(f"rvlr.student_relation must be one of {STUDENT_RELATIONS}, got {o.student_relation!r}")
        if o.relation_temperature <= 0:
            raise ConfigError("rvlr.relation_temperature must be positive")
        base = dict(o.base)
        if base.get("name") in (None, "rvlr"):
            raise ConfigError("rvlr.base must name the method to train, e.g. {name: finetune}")
        self.base = build_method(base, backbone)
        if type(self.base).forward is not Method.forward:
            raise ConfigError(f"rvlr replaces the CLIP loss; base method {base['name']!r} has its own loss")
        self.base.max_words = self._max_words
        # teacher dims are needed at build time (the linear maps are checkpointed), the features only in training
        teachers = o.w_rep_image or o.w_rep_text or o.w_kd
        image_dim = _cache_dim(o.image_teacher, o.image_teacher_dim, "image_teacher") if teachers else 0
        text_dim = _cache_dim(o.text_teacher, o.text_teacher_dim, "text_teacher") if teachers else 0
        embed = backbone.embed_dim
        self.rep_image = nn.Linear(image_dim, embed) if o.w_rep_image else None
        self.rep_text = nn.Linear(text_dim, embed) if o.w_rep_text else None
        # lambda only acts through the structure terms: without them it is not a parameter to train
        self.lam = nn.Parameter(torch.tensor(float(o.lam)), requires_grad=o.learn_lambda and bool(o.w_kd))
        self.tau2 = nn.Parameter(
            torch.tensor(float(o.relation_temperature)), requires_grad=o.learn_relation_temperature
        )
        self._teachers: tuple[Any, Any] | None = None  # (image cache, text cache), opened by bind_train_set
        self._rows: tuple[Tensor, Tensor] | None = None  # dataset image index -> row, pair index -> row
        self.last_terms: dict[str, float] = {}

    # ---- the base method's encoders, prompts and settings ---------------------------------------------
    @property
    def max_words(self) -> int:
        return self._max_words

    @max_words.setter
    def max_words(self, value: int) -> None:
        self._max_words = value
        if "base" in self._modules:
            self.base.max_words = value

    @property
    def uses_teachers(self) -> bool:
        o = self.options
        return bool(o.w_rep_image or o.w_rep_text or o.w_kd)

    def plans(self) -> Plans:
        return self.base.plans()

    def tokenize(self, texts):
        return self.base.tokenize(texts)

    def encode_image(self, images: Tensor, plans: Plans | None = None) -> Tensor:
        return self.base.encode_image(images, plans)

    def encode_video(self, frames: Tensor, mask: Tensor | None = None, plans: Plans | None = None) -> Tensor:
        return self.base.encode_video(frames, mask, plans)

    def encode_visual(self, visual: Tensor, mask: Tensor | None = None, plans: Plans | None = None) -> Tensor:
        return self.base.encode_visual(visual, mask, plans)

    def encode_text(self, texts, plans: Plans | None = None) -> Tensor:
        return self.base.encode_text(texts, plans)

    @property
    def logit_scale(self) -> Tensor:
        return self.base.logit_scale

    # ---- teachers ----------------------------------------------------------------------------------
    def bind_train_set(self, pairs: Any, data: Any) -> None:
        """Map the training set's images and captions to teacher rows (ids and checksum checked)."""
        if not self.uses_teachers:
            return
        from vlprompt.data.features import FeatureCache, pair_sample_ids

        image_cache, text_cache = FeatureCache(self.options.image_teacher), FeatureCache(self.options.text_teacher)
        for cache, linear, what in ((image_cache, self.rep_image, "image"), (text_cache, self.rep_text, "text")):
            if linear is not None and linear.in_features != cache.dim:
                raise ConfigError(f"rvlr: {what} teacher cache has {cache.dim}-d features, the model expects "
                                  f"{linear.in_features}")  # fmt: skip
        image_ids, caption_ids = pair_sample_ids(pairs, data.root)
        self._rows = (
            torch.from_numpy(image_cache.rows_of(image_ids)),
            torch.from_numpy(text_cache.rows_of(caption_ids)),
        )
        self._teachers = (image_cache, text_cache)

    def teacher_features(self, visual_index: Tensor, sample_index: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen teacher features (image, caption) of a batch, from its image and pair indices."""
        if self._teachers is None or self._rows is None:
            raise RuntimeError("rvlr needs bind_train_set(pairs, data) before training (the trainer calls it)")
        device = self.lam.device
        image = self._teachers[0].take(self._rows[0][visual_index.cpu()])
        text = self._teachers[1].take(self._rows[1][sample_index.cpu()])
        return torch.from_numpy(image).to(device), torch.from_numpy(text).to(device)

    # ---- loss --------------------------------------------------------------------------------------
    def lambda_value(self) -> Tensor:
        """lambda as used in E (clamped to [0, 1] when ``clamp_lambda``)."""
        return self.lam.clamp(0.0, 1.0) if self.options.clamp_lambda else self.lam

    def loss_terms(self, u: Tensor, t: Tensor, ids: Tensor, a: Tensor | None, b: Tensor | None) -> dict[str, Tensor]:
        """Unweighted loss terms of a (global) batch: student ``u``/``t``, image ids, teacher ``a``/``b``."""
        o = self.options
        q = soft_targets(ids) if o.soft_targets else torch.eye(len(ids), device=u.device)
        s = self.logit_scale
        terms = {"clip": 0.5 * (soft_cross_entropy(s * u @ t.T, q) + soft_cross_entropy(s * t @ u.T, q))}
        if self.rep_image is not None:
            terms["rep_image"] = soft_cross_entropy(s * u @ F.normalize(self.rep_image(a), dim=-1).T, q)
        if self.rep_text is not None:
            terms["rep_text"] = soft_cross_entropy(s * t @ F.normalize(self.rep_text(b), dim=-1).T, q)
        if o.w_kd:
            tau = self.tau2.clamp(min=1e-3)
            r_image, r_text = off_diagonal(relation_matrix(a, tau)), off_diagonal(relation_matrix(b, tau))
            target = teacher_mix(r_image, r_text, self.lambda_value())
            if o.student_relation == "pair":
                students = [off_diagonal(relation_matrix(F.normalize(u, dim=-1) + F.normalize(t, dim=-1), tau))]
            else:
                students = [off_diagonal(relation_matrix(u, tau)), off_diagonal(relation_matrix(t, tau))]
            terms["kd"] = sum(relation_distance(r, target, o.distance) for r in students)
            if o.learn_lambda:
                terms["kd_image"] = relation_distance(r_image, target, o.distance)
                terms["kd_text"] = relation_distance(r_text, target, o.distance)
        return terms

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """The weighted sum of :meth:`loss_terms`."""
        o = self.options
        weights = {"clip": o.w_clip, "rep_image": o.w_rep_image, "rep_text": o.w_rep_text, "kd": o.w_kd,
                   "kd_image": o.w_kd_teachers, "kd_text": o.w_kd_teachers}  # fmt: skip
        return sum(weights[k] * v for k, v in terms.items())

    def forward(
        self,
        visual: Tensor,
        tokens: Tensor,
        mask: Tensor | None = None,
        sample_index: Tensor | None = None,
        visual_index: Tensor | None = None,
    ) -> Tensor:
        """RVLR loss of a batch; ``visual_index`` (image ids) and ``sample_index`` (pair ids) come from the trainer."""
        plans = self.base.plans()
        u = self.base.encode_visual(visual, mask, plans)
        t = self.base.encode_text(tokens, plans)
        ids = visual_index.to(u.device) if visual_index is not None else torch.arange(len(u), device=u.device)
        a = b = None
        if self.uses_teachers:
            if sample_index is None or visual_index is None:
                raise RuntimeError("rvlr needs the batch's sample_index and visual_index (the trainer passes them)")
            a, b = (gather_with_grad(x) for x in self.teacher_features(visual_index, sample_index))
        terms = self.loss_terms(gather_with_grad(u), gather_with_grad(t), gather_with_grad(ids), a, b)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return self.total(terms)
