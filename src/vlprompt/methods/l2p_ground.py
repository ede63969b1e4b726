"""L2P for referring-expression grounding: the ``l2p`` baseline of LPI's grounding benchmark (spec ``lpi.md``
section 5, ``L2pPrompt(length 4, pool 12, top-k 4, batchwise_prompt=True, prompt_key=True)``), visual only.

ONE :class:`~vlprompt.prompts.pool.PromptPool` shared by every task (no per-task modules, no routing): 12 prompts of
4 vision tokens and 12 learned keys, all U(-1, 1). The query is the frozen detector backbone's L2-normalised image
feature (the routing feature of the other grounding methods); the 4 keys of highest cosine pick 4 prompts, whose 16
tokens are inserted after CLS (after ``ln_pre``, as the retrieval ``l2p``) and dropped by the detector before its
heads. The text tower runs unprompted. In training the batch's majority choice serves every image (L2P's
``batchwise_prompt``, LPI's setting; ``batchwise_train``); at evaluation each image keeps its own choice, so an answer
never depends on its batch. Loss: the detector's REC loss + ``pull_weight`` · L2P's surrogate
``mean_b Σ_k (1 - cos(query_b, key_k))`` drawing the chosen keys to their queries (as the retrieval ``l2p``; LPI's
grounding code computes this ``reduce_sim`` but never adds it, ``pull_weight=0`` reproduces that).

**Not ported** (GLIP-only): the reference overwrites the first 16 Swin patch tokens with the prompts and queries with
their mean embedding; in a ViT detector every patch token is a box, so the prompts are inserted instead.

Trainable (shared by all tasks, trained in every task): ``pool · length · Dv + pool · E`` (E = the joint embedding
width of the query) = 12·4·768 + 12·512 = 36,864 + 6,144 = 43,008 at ViT-B/16 (spec section 7's "L2P done correctly at
768" row keys on 768-wide mean patch embeddings instead: 46,080).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.backbone.detector import Detector, DetectorOutput
from vlprompt.errors import ConfigError
from vlprompt.methods.base import Plans, register_method
from vlprompt.methods.continual import ContinualMethod
from vlprompt.methods.grounding import Between, GroundingMethod, GroundingOptions, rec_loss
from vlprompt.options import count, nonneg
from vlprompt.prompts.pool import PoolSelection, PromptPool


@dataclass
class L2PGroundOptions(GroundingOptions):
    num_tasks: int = nonneg(0)  # set by the continual runner (the shared pool does not depend on it)
    pool_size: int = count(12)  # M
    length: int = count(4)  # tokens per prompt
    pool_top_k: int = count(4)  # prompts chosen per image (``top_k`` is the boxes kept at evaluation)
    pull_weight: float = nonneg(0.1)  # L2P's surrogate-loss coefficient (0 = LPI's grounding code)
    batchwise_train: bool = True  # LPI's batchwise_prompt=True: the batch's majority choice while training
    init: str = "uniform"  # prompts and keys U(-1, 1), as L2P (see prompts.pool for the alternatives)


@register_method("l2p_ground")
class L2PGround(GroundingMethod, ContinualMethod):
    """A shared key-query pool of vision prompts on the detector (see the module docstring)."""

    Options = L2PGroundOptions

    def __init__(
        self, backbone: Backbone, options: Any = None, detector: Detector | None = None, train_heads: bool = False
    ) -> None:
        super().__init__(backbone, options, detector=detector, train_heads=train_heads)
        o = self.options
        if o.pool_top_k > o.pool_size:
            raise ConfigError(f"l2p_ground.pool_top_k ({o.pool_top_k}) cannot exceed pool_size ({o.pool_size})")
        dv, e = backbone.vision_width, backbone.embed_dim
        self.pool = PromptPool(o.pool_size, o.length, dv, e, o.pool_top_k, init=o.init, key_init=o.init)

    def select(self, images: Tensor) -> PoolSelection:
        """The pool's choice for ``images``, queried by their frozen features: the batch's majority choice while
        training with ``batchwise_train``, each image's own choice otherwise."""
        batchwise = self.options.batchwise_train and self.training
        return self.pool(self.frozen_image_features(images), batchwise=batchwise)

    @staticmethod
    def pool_plans(selection: PoolSelection) -> Plans:
        """The chosen prompts ``[B, k·length, Dv]`` inserted after CLS; the text tower unprompted."""
        return Plans(image=PromptPlan(insert=selection.prompts[:, 0]))

    def ground(
        self, images: Tensor, tokens: Tensor, plans: Plans | None = None, between: Between | None = None
    ) -> DetectorOutput:
        """Without explicit ``plans``, each image with the prompts the pool selects for it."""
        if plans is None:
            plans = self.pool_plans(self.select(images))
        return super().ground(images, tokens, plans, between)

    def forward(self, images: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """REC loss + ``pull_weight`` · the key pull term (terms in ``loss_terms``)."""
        selection = self.select(images)
        out = self.ground(images, tokens, self.pool_plans(selection))
        loss, terms, _ = rec_loss(out.logits[..., 0], out.boxes, targets.to(out.boxes), self.options)
        terms["pull"] = selection.pull_loss
        self.loss_terms = {name: float(t.detach()) for name, t in terms.items()}
        return loss + self.options.pull_weight * selection.pull_loss
