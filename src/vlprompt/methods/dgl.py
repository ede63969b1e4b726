"""DGL (Yang et al., AAAI 2024): dynamic global-local prompt tuning for text-video retrieval.

A frozen CLIP; one generator (``latent``: ``linear`` or ``transformer``) produces text prompts and per-frame
visual prompts for every layer from a shared latent space; ``n_global`` global prompts ride along the video
with global-local attention (frames see their own frame and the globals, globals see every frame). The prompts
do not depend on the sample, so they are generated once per step. The logit scale is CLIP's, frozen (100 for
OpenAI weights). Spec: ``shared/specs/dgl.md``.

Where the reference code and the paper differ, the default follows the paper and an option reproduces the code;
both options default to ``auto``, which selects the code's behaviour when ``reference_checkpoint`` is set (an
official checkpoint reproduces the reference's embeddings, and its published numbers, only that way) and the
paper's otherwise. An explicit value is always kept, with a warning when it departs from a loaded checkpoint's.

- ``video_embedding``: ``frame_mean`` (the frames' CLS embeddings averaged, the paper's description) or
  ``global_prompt0`` (the reference: the first global prompt's output), ``global_mean``, ``global_and_frame_mean``.
- ``postfix``: ``before_eot`` (postfix prompts right before end-of-text, so they reach the text embedding) or
  ``inert`` (the reference appends them after the padded caption, where the causal mask makes them dead; they
  still shape the other prompts through the transformer generator, so only the text tower skips them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.options import count, nonneg
from vlprompt.prompts import DGLLinearPrompts, DGLPrompts, DGLTransformerPrompts

VIDEO_EMBEDDINGS = ("auto", "frame_mean", "global_prompt0", "global_mean", "global_and_frame_mean")
POSTFIX_MODES = ("auto", "before_eot", "inert")
#: What ``auto`` selects: the paper's behaviour, or the reference code's when a reference checkpoint is loaded
#: (its published numbers were produced that way: ``visual_output_type=global_prompt0``, postfix after end-of-text).
PAPER_BEHAVIOUR = {"video_embedding": "frame_mean", "postfix": "before_eot"}
REFERENCE_BEHAVIOUR = {"video_embedding": "global_prompt0", "postfix": "inert"}

log = logging.getLogger("vlprompt.methods")


@dataclass
class DGLOptions:
    latent: str = "transformer"  # transformer | linear (the shared latent space generator)
    n_global: int = count(4)  # G global prompts
    n_local: int = count(4)  # P local prompts per frame (and P prefix + P postfix text prompts)
    depth: int = nonneg(0)  # prompt layers K (0 = every layer)
    frames: int = nonneg(0)  # T, for the transformer's per-frame prompts; 0 = data.num_frames (set by the factory)
    video_embedding: str = "auto"  # auto: frame_mean, or global_prompt0 with a reference checkpoint
    postfix: str = "auto"  # auto: before_eot, or inert with a reference checkpoint
    reference_checkpoint: str = ""  # an official DGL checkpoint to start from (read by the factory)


def effective_behaviour(options: DGLOptions, key: str) -> str:
    """The effective ``video_embedding`` or ``postfix``: an explicit value as given; ``auto`` is the paper's, or
    the reference code's when ``reference_checkpoint`` is set (only then do its weights give its embeddings)."""
    value = getattr(options, key)
    if value != "auto":
        return value
    return (REFERENCE_BEHAVIOUR if options.reference_checkpoint else PAPER_BEHAVIOUR)[key]


@register_method("dgl")
class DGL(Method):
    """Prompts only: shared-latent-space text and frame prompts at every layer plus global video prompts."""

    Options = DGLOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if o.video_embedding not in VIDEO_EMBEDDINGS:
            raise ValueError(f"dgl.video_embedding must be one of {VIDEO_EMBEDDINGS}, got {o.video_embedding!r}")
        if o.postfix not in POSTFIX_MODES:
            raise ValueError(f"dgl.postfix must be one of {POSTFIX_MODES}, got {o.postfix!r}")
        layers = min(backbone.vision.num_layers, backbone.text.num_layers)
        depth = o.depth or layers
        if not 1 <= depth <= layers:
            raise ValueError(f"dgl.depth must be in 1..{layers}, got {depth}")
        patch = backbone.vision.visual.patch_size[0]
        widths = dict(vision_width=backbone.vision_width, text_width=backbone.text_width, patch=patch)
        if o.latent == "linear":
            self.prompts = DGLLinearPrompts(depth, o.n_local, o.n_global, **widths)
        elif o.latent == "transformer":
            if o.frames < 1:
                raise ValueError("dgl.frames must be set (the transformer generator has per-frame prompts)")
            heads = backbone.vision.blocks[0].attn.num_heads
            self.prompts = DGLTransformerPrompts(depth, o.n_local, o.n_global, 2 * o.n_local, o.frames, heads=heads,
                                                 **widths)  # fmt: skip
        else:
            raise ValueError(f"dgl.latent must be 'linear' or 'transformer', got {o.latent!r}")
        if o.reference_checkpoint:
            self._note_reference_behaviour()

    @property
    def video_embedding(self) -> str:
        """How a video embedding is read out (see :data:`VIDEO_EMBEDDINGS`), ``auto`` resolved."""
        return effective_behaviour(self.options, "video_embedding")

    @property
    def postfix(self) -> str:
        """Where the postfix text prompts go (see :data:`POSTFIX_MODES`), ``auto`` resolved."""
        return effective_behaviour(self.options, "postfix")

    def _note_reference_behaviour(self) -> None:
        """Say what a reference checkpoint selects, and warn when an explicit setting departs from the reference."""
        chosen = {key: effective_behaviour(self.options, key) for key in REFERENCE_BEHAVIOUR}
        if auto := [f"{k}={v}" for k, v in chosen.items() if getattr(self.options, k) == "auto"]:
            log.warning("dgl: reference checkpoint given, so %s (the reference code's behaviour)", ", ".join(auto))
        if differ := [k for k, v in chosen.items() if v != REFERENCE_BEHAVIOUR[k]]:
            log.warning(
                "dgl: %s set explicitly; the reference checkpoint then does not reproduce the reference's embeddings "
                "(it uses %s; set %s to follow it)",
                ", ".join(f"{k}={chosen[k]}" for k in differ),
                ", ".join(f"{k}={REFERENCE_BEHAVIOUR[k]}" for k in differ),
                " and ".join(f"method.{k}=auto" for k in differ),
            )

    def plans(self) -> Plans:
        p: DGLPrompts = self.prompts()
        frames = p.frames if p.frames.dim() == 3 else p.frames.transpose(0, 1)  # [K, P, D] or [T, K, P, D]
        layer = (lambda k: frames[k]) if frames.dim() == 3 else (lambda k: frames[:, k])
        depth = p.text.shape[0]
        vision = PromptPlan(
            insert=layer(0), replace={k: layer(k) for k in range(1, depth)}, global_tokens=p.globals
        )  # fmt: skip
        prefix = p.prefix()
        text = PromptPlan(insert=prefix[0], replace={k: prefix[k] for k in range(1, depth)})
        if self.postfix == "before_eot":
            text.suffix = dict(enumerate(p.postfix()))
        return Plans(image=vision, text=text)

    def encode_video(self, frames: Tensor, mask: Tensor | None = None, plans: Plans | None = None) -> Tensor:
        """Video embeddings ``[B, E]`` under global-local attention; the frame mask is ignored, as in DGL."""
        plans = plans if plans is not None else self.plans()
        if self.options.latent == "transformer" and frames.shape[1] != self.options.frames:
            raise ValueError(f"DGL-Transformer has prompts for {self.options.frames} frames, got {frames.shape[1]}")
        how = self.video_embedding
        out = self.backbone.vision(frames, plans.image, return_tokens=how in ("global_mean", "global_and_frame_mean"))
        if how == "global_prompt0":
            video = out.pooled
        elif how == "frame_mean":
            video = out.frames.mean(dim=1)
        else:
            globals_ = self.backbone.vision.project_tokens(out.tokens)
            video = globals_.mean(1) if how == "global_mean" else torch_cat_mean(globals_, out.frames)
        return F.normalize(video, dim=-1)

    def import_reference(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """An official DGL checkpoint's prompt tensors under our names (spec section 9.14)."""
        return from_reference_state_dict(state_dict, self.options.latent)

    def encode_image(self, images: Tensor, plans: Plans | None = None) -> Tensor:
        """Images are one-frame videos."""
        return self.encode_video(images.unsqueeze(1), None, plans)


#: The reference's trainable keys (official checkpoints, after stripping ``module.`` and ``clip.``) → ours.
REFERENCE_KEYS = {
    "linear": {
        "visual_prompt_embedding": "prompts.visual",
        "prefix_text_prompt_proj_layer.": "prompts.prefix_proj.",
        "postfix_text_prompt_proj_layer.": "prompts.postfix_proj.",
        "visual.prompt_embeddings": "prompts.global_prompts",
    },
    "transformer": {
        "unified_prompt_embedding.weight": "prompts.embedding.weight",
        "PromptTransformer.resblocks.0.": "prompts.block.",  # the same CLIP block layout as open_clip's
        "unified_prompt_mlp.c_fc.": "prompts.mlp.0.",
        "unified_prompt_mlp.c_proj.": "prompts.mlp.2.",
        "visual.prompt_embeddings": "prompts.global_prompts",
    },
}


def from_reference_state_dict(state_dict: dict[str, Tensor], latent: str) -> dict[str, Tensor]:
    """The prompt tensors of an official DGL checkpoint under our names (the frozen CLIP in it is dropped).

    Both layouts are the reference's own (``[1, P, K*Dv]`` frame table, frame-major rows), so tensors map one
    to one. Raises ``KeyError`` naming what is missing when the checkpoint is not a DGL-``latent`` one.
    """
    table = REFERENCE_KEYS[latent]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").removeprefix("clip.")
        for theirs, ours in table.items():
            if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
                out[ours + key[len(theirs) :]] = value
    found = {theirs for theirs in table if any(k.removeprefix("module.").removeprefix("clip.").startswith(theirs)
                                               for k in state_dict)}  # fmt: skip
    if missing := sorted(set(table) - found):
        raise KeyError(f"not a DGL-{latent} checkpoint: no {', '.join(missing)}")
    return out


def to_reference_state_dict(method: DGL) -> dict[str, Tensor]:
    """Our trainable prompt tensors under the reference's names (prefixed ``clip.``), the inverse mapping."""
    table = REFERENCE_KEYS[method.options.latent]
    out = {}
    for key, value in method.trainable_state_dict().items():
        for theirs, ours in table.items():
            if key == ours or (ours.endswith(".") and key.startswith(ours)):
                out["clip." + theirs + key[len(ours) :]] = value
    return out


def torch_cat_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the tokens of ``a [B, n, E]`` and ``b [B, m, E]`` together."""
    return (a.sum(1) + b.sum(1)) / (a.shape[1] + b.shape[1])
