"""LPI for referring-expression grounding (Kelvin-ywc/LPI ``grounding/``, spec ``lpi.md`` sections 2.4, 3.4, 4).

Per task: a :class:`~vlprompt.prompts.lpi.DecomposedPrompt` (CP rank 4, L = 9 layer slices, N = 16 tokens, the layer
factor shared by both towers) entering both towers at depth 9 (slice 0 inserted, 1..8 added; see
:mod:`~vlprompt.methods.continual_grounding`), and an interaction module: before each block ``1 <= l < depth``, the
N vision prompt tokens ``v`` and the N text prompt tokens ``t`` of the *same* image-expression pair are mixed,
``v <- LN_v(0.9 v + 0.1 (t W_t2v[l] + b))``, ``t <- LN_t(0.9 t + 0.1 (v W_v2t[l] + b))``, the per-layer maps stored as
CP tensors over all tower layers (LPI's ``InteractModule``, the spec's CLIP port:
:class:`~vlprompt.prompts.lpi.LowRankInteraction` on hidden states). The towers run in lock-step for it
(:func:`~vlprompt.backbone.towers.run_paired`); the coupling is
:func:`~vlprompt.methods.continual_grounding.prompt_interaction`, shared with DCP.

Loss (spec 3.4, the grounding variant): the detector's REC loss + 0.1 L_align (each layer's [N] vector L2-normalised,
scale 100 = temperature 0.01) + 0.1 L_task (tau = 0.01, from the second task on). Trainable per task:
``r (L + 2N + Dv + Dt)`` prompt factors + ``2 r (L_towers + Dv + Dt + 1) + 2 (Dv + Dt)`` interaction parameters:
5,284 + 12,904 = 18,188 at ViT-B/16 (spec section 7's "LPI grounding" row is GLIP's shapes: 3,620 + 8,744).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vlprompt.backbone import Backbone
from vlprompt.backbone.detector import Detector
from vlprompt.methods.base import register_method
from vlprompt.methods.continual_grounding import TaskGroundingMethod, TaskGroundingOptions, interaction_modules
from vlprompt.methods.lpi import layer_alignment_loss, prompt_task_loss
from vlprompt.options import count, nonneg, positive
from vlprompt.prompts.lpi import DecomposedPrompt


@dataclass
class LPIGroundOptions(TaskGroundingOptions):
    depth: int = count(9)  # PROMPT_DEPTH = INTERACT_DEPTH = 9
    layers: int = count(9)  # L, layer slices of the prompt tensor
    rank: int = count(4)  # PROMPT_LORA_D
    init_std: float = nonneg(0.5)
    interact: bool = True
    interact_rank: int = count(4)  # INTERACT_LORA_D
    interact_mix: float = nonneg(0.1)  # v <- LN((1 - m) v + m v')
    align_weight: float = nonneg(0.1)
    align_temperature: float = positive(0.01)  # grounding: L2-normalised rows, scale 100
    align_normalize: bool = True
    task_weight: float = nonneg(0.1)
    task_temperature: float = positive(0.01)  # grounding: 0.01 (retrieval 0.001)
    double_sigmoid: bool = False  # the reference's BCE-with-logits on sigmoid outputs (fidelity only)


@register_method("lpi_ground")
class LPIGround(TaskGroundingMethod):
    """LPI's grounding model on the OWL-ViT-style detector (see the module docstring)."""

    Options = LPIGroundOptions

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options, detector=detector, train_heads=train_heads)
        o = self.options
        if o.depth > o.layers:
            raise ValueError(f"lpi_ground.depth ({o.depth}) cannot exceed the prompt's layer slices ({o.layers})")
        dv, dt = backbone.vision_width, backbone.text_width
        self.prompts = nn.ModuleList(
            DecomposedPrompt(o.layers, o.n_tokens, dv, dt, o.rank, o.init_std) for _ in range(self.num_tasks)
        )
        if o.interact:  # applied before blocks 1..depth-1 (INTERACT_DEPTH = PROMPT_DEPTH), see TaskGroundingMethod
            self.interactions = interaction_modules(backbone, self.num_tasks, o.interact_rank, o.interact_mix)
        self.begin_task(0)

    def forward(self, images: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """REC loss + 0.1 L_align + 0.1 L_task (terms in ``loss_terms``)."""
        o, task = self.options, self.current_task
        loss = super().forward(images, tokens, targets)
        terms = dict(self.loss_terms)
        pv, pt = self.prompts[task]()
        if o.align_weight:
            align = layer_alignment_loss(pv, pt, o.align_temperature, o.align_normalize)
            loss, terms["align"] = loss + o.align_weight * align, float(align.detach())
        if o.task_weight and task > 0:
            tc = prompt_task_loss(self.prompts, task, pv, pt, self.task_relation, o.task_temperature, o.double_sigmoid)
            loss, terms["task"] = loss + o.task_weight * tc, float(tc.detach())
        self.loss_terms = terms
        return loss
