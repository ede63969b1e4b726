"""An OWL-ViT-style open-vocabulary detector on the promptable towers (Minderer et al., ECCV 2022; OWLv2 the same).

OWL-ViT is a CLIP with two small heads, so every prompt plan applies to it unchanged. The math follows
``transformers``' ``OwlViTForObjectDetection`` / ``Owlv2ForObjectDetection`` (tested to float tolerance against a
random tiny ``transformers`` model, ``tests/backbone/test_detector.py``):

* the vision tower's final tokens pass ``ln_post`` (CLIP's post layer norm, on every token); each patch token is
  multiplied by the class token and layer-normed again by the detector's own ``layer_norm`` -> patch features
  ``[B, P, D]`` in row-major grid order (``P = grid_h * grid_w``). Prompt tokens a plan *inserts* are dropped before
  this (they are not patches); tokens a plan *replaces or adds to in place* stay, since they occupy patch positions;
* **box head**: ``MLP(D -> D -> D -> 4)`` with exact GELU, plus the patch-position bias (:func:`box_bias`), then a
  sigmoid: ``cxcywh`` normalised to the model input, one box per patch;
* **class head**: ``dense0`` projects each patch to the joint space; patch and query embeddings are L2-normalised
  (``x / (|x| + 1e-6)``), their dot product is shifted and scaled per patch:
  ``(s + shift(f)) * (elu(scale(f)) + 1)`` -> logits ``[B, P, Q]``;
* OWLv2's **objectness head** (same MLP shape, 1 output, on detached features) when built with ``objectness=True``;
  REC does not use it (the expression's own logit ranks the patches), it is kept so OWLv2 checkpoints load whole.

Top-k answers for REC come from :meth:`Detector.predict` as normalised ``cxcywh`` boxes; conversion to pixel
``xyxy`` (what ``eval.grounding.precision_at_k`` takes) is done by the grounding methods with ``eval.grounding``'s
box functions (the backbone layer does not import ``eval``). Importing real OWL-ViT / OWLv2 checkpoints:
:mod:`vlprompt.backbone.owlvit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone.backbone import Backbone
from vlprompt.backbone.plan import PromptPlan
from vlprompt.backbone.towers import VisionTower, run_paired

#: OWL-ViT's ``log(x + eps) - log1p(-x + eps)`` (an inverse sigmoid kept finite at 0 and 1).
BOX_BIAS_EPS = 1e-4
#: The class head's ``x / (|x| + eps)`` normalisation.
CLASS_NORM_EPS = 1e-6


def _inverse_sigmoid(x: Tensor) -> Tensor:
    return torch.log(x + BOX_BIAS_EPS) - torch.log1p(-x + BOX_BIAS_EPS)


def box_bias(grid_h: int, grid_w: int) -> Tensor:
    """OWL-ViT's box prior ``[grid_h * grid_w, 4]`` (``cx, cy, w, h`` in inverse-sigmoid space), row-major.

    Patch ``(i, j)`` (row ``i``, column ``j``) is biased towards the centre ``((j + 1) / grid_w, (i + 1) / grid_h)``,
    i.e. its bottom-right *corner* as OWL-ViT (and ``transformers``) compute it, and towards one patch in size
    ``(1 / grid_w, 1 / grid_h)``. The head's output is added to it before the sigmoid.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"box bias needs a grid of at least 1x1 patches, got {grid_h}x{grid_w}")
    ys, xs = torch.meshgrid(
        torch.arange(1, grid_h + 1, dtype=torch.float32) / grid_h,
        torch.arange(1, grid_w + 1, dtype=torch.float32) / grid_w,
        indexing="ij",
    )
    centre = torch.stack((xs, ys), dim=-1).reshape(-1, 2).clamp(0.0, 1.0)
    size = torch.tensor([1.0 / grid_w, 1.0 / grid_h]).expand_as(centre)
    return torch.cat((_inverse_sigmoid(centre), _inverse_sigmoid(size)), dim=-1)


class BoxHead(nn.Module):
    """OWL-ViT's per-patch MLP ``D -> D -> D -> out`` with exact GELU (box: 4 outputs; objectness: 1)."""

    def __init__(self, width: int, out_dim: int = 4) -> None:
        super().__init__()
        self.dense0 = nn.Linear(width, width)
        self.dense1 = nn.Linear(width, width)
        self.dense2 = nn.Linear(width, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.dense2(F.gelu(self.dense1(F.gelu(self.dense0(features)))))


class ClassHead(nn.Module):
    """OWL-ViT's class head: per-patch class embedding scored against query embeddings, shifted and scaled."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.dense0 = nn.Linear(width, embed_dim)
        self.logit_shift = nn.Linear(width, 1)
        self.logit_scale = nn.Linear(width, 1)

    def embed(self, features: Tensor) -> Tensor:
        """Normalised class embeddings ``[B, P, E]`` of patch features ``[B, P, D]``."""
        x = self.dense0(features)
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + CLASS_NORM_EPS)

    def forward(self, features: Tensor, queries: Tensor, query_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, P, Q]`` of patch features ``[B, P, D]`` against queries ``[Q, E]`` (shared by the batch)
        or ``[B, Q, E]`` (per image); ``query_mask`` (``[Q]`` / ``[B, Q]``, False = padding) masks whole queries."""
        q = queries / (torch.linalg.vector_norm(queries, dim=-1, keepdim=True) + CLASS_NORM_EPS)
        patches = self.embed(features)
        sim = patches @ (q.transpose(-1, -2) if q.dim() == 3 else q.T)
        scale = F.elu(self.logit_scale(features)) + 1.0
        logits = (sim + self.logit_shift(features)) * scale
        if query_mask is not None:
            keep = query_mask.to(torch.bool).unsqueeze(-2)  # [.., 1, Q]
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        return logits


@dataclass
class DetectorOutput:
    """One forward pass: ``logits [B, P, Q]``, ``boxes [B, P, 4]`` (``cxcywh`` in [0, 1] of the model input),
    ``features [B, P, D]`` (merged patch features), ``queries`` (normalised query embeddings ``[Q, E]`` or
    ``[B, Q, E]``) and, with an objectness head, ``objectness [B, P]`` (logits)."""

    logits: Tensor
    boxes: Tensor
    features: Tensor
    queries: Tensor
    objectness: Tensor | None = None


@dataclass
class TopBoxes:
    """The ``k`` best patches per image, best first: ``boxes [B, k, 4]`` normalised ``cxcywh``, ``scores [B, k]``
    (the class logits) and ``patches [B, k]`` (row-major patch indices)."""

    boxes: Tensor
    scores: Tensor
    patches: Tensor


def rank_patches(scores: Tensor, boxes: Tensor, k: int) -> TopBoxes:
    """The ``k`` highest-scoring patches of ``scores [B, P]`` with their ``boxes [B, P, 4]``; equal scores keep the
    lower patch index first (a stable sort), so the answer never depends on the kernel."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    top = boxes.gather(-2, order.unsqueeze(-1).expand(*order.shape, boxes.shape[-1]))
    return TopBoxes(top, scores.gather(-1, order), order)


def drop_inserted(tokens: Tensor, plan: PromptPlan | None) -> Tensor:
    """``tokens [B, L, D]`` without the prompt tokens ``plan`` inserted (positions ``[start, start + n)``)."""
    n = plan.num_inserted if plan is not None else 0
    if not n:
        return tokens
    start = plan.at(VisionTower.first_position).start
    return torch.cat((tokens[:, :start], tokens[:, start + n :]), dim=1)


class Detector(nn.Module):
    """OWL-ViT's detection heads on a :class:`Backbone`'s promptable towers (see the module docstring).

    Heads start as ``nn.Linear`` / ``nn.LayerNorm`` initialise them (train them, or import real ones with
    :func:`vlprompt.backbone.owlvit.load_owlvit`). The joint embedding width of the class head is the
    backbone's ``embed_dim``.
    """

    def __init__(self, backbone: Backbone, objectness: bool = False, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.backbone = backbone
        width, device = backbone.vision_width, backbone.device
        self.layer_norm = nn.LayerNorm(width, eps=layer_norm_eps).to(device)
        self.class_head = ClassHead(width, backbone.embed_dim).to(device)
        self.box_head = BoxHead(width, 4).to(device)
        self.objectness_head = BoxHead(width, 1).to(device) if objectness else None
        self._bias: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row of the vision tower, ``(grid_h, grid_w)``."""
        h, w = self.backbone.vision.visual.grid_size
        return int(h), int(w)

    @property
    def image_size(self) -> tuple[int, int]:
        """The input ``(height, width)`` the vision tower's positional embedding was made for."""
        size = self.backbone.vision.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else (int(size), int(size))

    def heads(self) -> list[nn.Module]:
        """The detector's own modules (everything but the towers)."""
        return [m for m in (self.layer_norm, self.class_head, self.box_head, self.objectness_head) if m is not None]

    def box_bias(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """:func:`box_bias` of this tower's grid, computed once per device and dtype (it depends on no sample)."""
        key = (*self.grid, torch.device(device), dtype)
        if key not in self._bias:
            self._bias[key] = box_bias(*self.grid).to(device=device, dtype=dtype)
        return self._bias[key]

    # ---- the pieces --------------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"the detector takes images [B, 3, H, W], got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            h, w = self.image_size
            gh, gw = self.grid
            raise ValueError(
                f"the detector's vision tower takes {h}x{w} images (its positional embedding covers {gh}x{gw} "
                f"patches), got {images.shape[-2]}x{images.shape[-1]}: resize the images first (OWL-ViT squashes "
                "them to the square, OWLv2 pads them to a square and resizes)"
            )

    def patch_features(self, images: Tensor, plan: PromptPlan | None = None) -> Tensor:
        """Merged patch features ``[B, P, D]``: ``layer_norm(ln_post(patch) * ln_post(cls))``, prompts dropped."""
        self._check_images(images)
        tokens = self.backbone.vision(images.to(self.backbone.device), plan, return_tokens=True).tokens
        return self.merge_patches(tokens, plan)

    def merge_patches(self, tokens: Tensor, plan: PromptPlan | None = None) -> Tensor:
        """:meth:`patch_features` of the vision tower's final tokens ``[B, L, D]`` (run under ``plan``)."""
        tokens = self.backbone.vision.visual.ln_post(drop_inserted(tokens, plan))
        patches = tokens[:, 1:] * tokens[:, :1]
        if patches.shape[1] != math.prod(self.grid):
            raise ValueError(
                f"{patches.shape[1]} patch tokens for a {self.grid} grid: a plan added tokens "
                "the detector cannot place"
            )
        return self.layer_norm(patches.to(self.layer_norm.weight.dtype))

    def query_embeddings(self, tokens: Tensor, plan: PromptPlan | None = None) -> Tensor:
        """L2-normalised text embeddings of token ids ``[Q, L]`` -> ``[Q, E]`` or ``[B, Q, L]`` -> ``[B, Q, E]``."""
        if tokens.dim() not in (2, 3):
            raise ValueError(f"query tokens must be [Q, L] or [B, Q, L], got shape {tuple(tokens.shape)}")
        flat = tokens.reshape(-1, tokens.shape[-1]).to(self.backbone.device)
        out = F.normalize(self.backbone.text(flat, plan).pooled, dim=-1)
        return out.reshape(*tokens.shape[:-1], out.shape[-1]).to(self.layer_norm.weight.dtype)

    def predict_boxes(self, features: Tensor) -> Tensor:
        """Boxes ``[B, P, 4]``: ``sigmoid(box_head(f) + box_bias)``, ``cxcywh`` normalised to the input."""
        return torch.sigmoid(self.box_head(features) + self.box_bias(features.device, features.dtype))

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        image_plan: PromptPlan | None = None,
        text_plan: PromptPlan | None = None,
        query_mask: Tensor | None = None,
    ) -> DetectorOutput:
        """Detect queries ``tokens`` (``[Q, L]`` for every image, or ``[B, Q, L]`` per image) in ``images``."""
        features = self.patch_features(images, image_plan)
        queries = self.query_embeddings(tokens, text_plan)
        if queries.dim() == 3 and queries.shape[0] != features.shape[0]:
            raise ValueError(f"{queries.shape[0]} query lists for {features.shape[0]} images")
        return self._heads(features, queries, query_mask)

    def forward_paired(
        self,
        images: Tensor,
        tokens: Tensor,
        image_plan: PromptPlan | None,
        text_plan: PromptPlan | None,
        between: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]],
    ) -> DetectorOutput:
        """REC with the towers in lock-step (:func:`~vlprompt.backbone.towers.run_paired`): image ``i`` with its
        own expression ``tokens[i]`` (``[B, L]``), ``between(layer, x_vision, x_text)`` coupling them before every
        block (LPI's per-layer interaction); logits ``[B, P, 1]``."""
        self._check_images(images)
        if tokens.dim() != 2:
            raise ValueError(f"paired grounding takes one expression per image [B, L], got {tuple(tokens.shape)}")
        b = self.backbone
        images, tokens = images.to(b.device), tokens.to(b.device)
        vis, txt = run_paired(b.vision, b.text, images, tokens, image_plan, text_plan, between)
        queries = F.normalize(txt.pooled, dim=-1)[:, None].to(self.layer_norm.weight.dtype)
        return self._heads(self.merge_patches(vis.tokens, image_plan), queries, None)

    def _heads(self, features: Tensor, queries: Tensor, query_mask: Tensor | None) -> DetectorOutput:
        objectness = None
        if self.objectness_head is not None:
            objectness = self.objectness_head(features.detach())[..., 0]  # OWLv2 trains it on detached features
        return DetectorOutput(
            logits=self.class_head(features, queries, query_mask),
            boxes=self.predict_boxes(features),
            features=features,
            queries=queries,
            objectness=objectness,
        )

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        tokens: Tensor,
        k: int = 10,
        image_plan: PromptPlan | None = None,
        text_plan: PromptPlan | None = None,
    ) -> TopBoxes:
        """REC: for each image its expression (``tokens [B, L]``, row ``i`` for image ``i``), the ``k`` boxes of the
        highest-scoring patches, best first (``boxes[:, 0]`` is the answer)."""
        if tokens.dim() != 2 or tokens.shape[0] != images.shape[0]:
            raise ValueError(
                f"predict takes one expression per image: tokens [B, L] for {images.shape[0]} images, "
                f"got shape {tuple(tokens.shape)}"
            )
        out = self(images, tokens[:, None], image_plan, text_plan)
        return rank_patches(out.logits[..., 0], out.boxes, k)
