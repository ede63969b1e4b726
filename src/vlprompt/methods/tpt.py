"""TPT (Shu et al., NeurIPS 2022): test-time tuning by entropy minimisation over the most confident views.

This module also holds what every classification TTA method shares (RLCF builds on it): the two tuning
variants, class prompts, confident-view selection and the per-sample :class:`Episode`.

- ``tune: prompt``: a CoOp context of ``n_ctx`` vectors (from "a photo of a" or a saved CoOp context) replaces the
  words before the class name; the image tower is frozen, so every view is encoded once per sample.
- ``tune: encoder``: the image tower trains (all of it, or only its normalisation layers); class features are
  fixed and computed once per class list.

The TTA runner (``vlprompt.runners.tta``) owns the episode loop: ``begin`` (views -> selection), ``loss`` per step,
``predict``, then it restores the trainable tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.data.classnames import format_prompts, split_template, underscore_template
from vlprompt.errors import ConfigError
from vlprompt.methods.base import Method, Plans, register_method
from vlprompt.options import count, nonneg
from vlprompt.prompts import TextContext
from vlprompt.safe_pickle import load_torch_tensors


@dataclass
class TPTOptions:
    tune: str = "prompt"  # prompt (CoOp context) | encoder (the image tower)
    n_ctx: int = count(4)
    ctx_init: str = "a photo of a"  # words whose embeddings start the context ("" = random)
    ctx_load: str = ""  # a saved context to start from: our .safetensors checkpoint or CoOp's .pth
    template: str = "a photo of a {}."  # the hard prompt (encoder variant, zero-shot, reward text)
    encoder_params: str = "all"  # encoder variant: all | norm (LayerNorm / BatchNorm parameters only)
    logit_scale: float = nonneg(100.0)  # logits = scale * cos (OpenAI CLIP's exp(logit_scale)); 0 = the backbone's own
    underscore_prompts: bool = False  # encoder variant: the reference's "a_photo_of_a {}." prompts (off = paper)


@dataclass
class Episode:
    """What one test sample's adaptation keeps between steps."""

    views: Tensor  # [N, 3, S, S], view 0 = the centre crop
    selected: Tensor | None = None  # indices of the confident views (fixed after step 0)
    image_feats: Tensor | None = None  # prompt variant: features of every view (the image tower is frozen)
    first_logits: Tensor | None = None  # prompt variant: step-0 logits of the selected views (with graph)
    before: Tensor | None = None  # the prediction before adaptation (a by-product of step 0; the TTA gain's baseline)
    extra: dict[str, Any] = field(default_factory=dict)  # method state, e.g. reward features


def confident_views(logits: Tensor, fraction: float) -> Tensor:
    """Indices of the ``floor(N * fraction)`` views with the lowest softmax entropy (at least one)."""
    logp = logits.float().log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    keep = max(1, int(logits.shape[0] * fraction))
    return torch.argsort(entropy, stable=True)[:keep]


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax over rows, computed in log space (TPT's objective)."""
    logp = logits.float().log_softmax(dim=-1)
    mean_logp = torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(logits.shape[0])))
    mean_logp = mean_logp.clamp(min=torch.finfo(mean_logp.dtype).min)
    return -(mean_logp.exp() * mean_logp).sum()


def load_context(path: str) -> Tensor:
    """A learned context ``[n_ctx, D]`` from a .safetensors checkpoint or a CoOp ``.pth`` (``state_dict.ctx``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"ctx_load: no such file {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = load_torch_tensors(file, "ctx_load checkpoint")  # tensors and plain values only, never code
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    keys = [k for k in state if k == "ctx" or k.endswith(".ctx")] if isinstance(state, dict) else []
    if len(keys) != 1:
        raise ConfigError(f"ctx_load: {file} has no single context tensor (keys ending in 'ctx': {keys})")
    return state[keys[0]].float()


class ClassificationTTA(Method):
    """Shared machinery of classification TTA; subclasses define :meth:`loss`."""

    Options = TPTOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if o.tune not in ("prompt", "encoder"):
            raise ConfigError(f"tune must be 'prompt' or 'encoder', got {o.tune!r}")
        if o.encoder_params not in ("all", "norm"):
            raise ConfigError(f"encoder_params must be 'all' or 'norm', got {o.encoder_params!r}")
        split_template(o.template)  # validates it
        self.context: TextContext | None = None
        if o.tune == "prompt":
            init = load_context(o.ctx_load) if o.ctx_load else None
            if init is None and o.ctx_init:
                init = self.word_embeddings(o.ctx_init, o.n_ctx)
            self.context = TextContext(o.n_ctx, backbone.text_width, init)
            self.n_placeholders = o.n_ctx
        else:
            norms = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
            modules = backbone.vision.visual.modules()
            chosen = [p for m in modules if isinstance(m, norms) for p in m.parameters(recurse=False)]
            for p in chosen if o.encoder_params == "norm" else backbone.vision.visual.parameters():
                p.requires_grad_(True)
        #: the reference runs class prompts at the full context length; benchmarks switch this off to replay it
        self.truncate_text = True
        self.class_names: list[str] = []
        self.class_tokens: Tensor | None = None
        self.frozen_class_feats: Tensor | None = None

    # ---- classes --------------------------------------------------------------------------------
    @property
    def hard_template(self) -> str:
        """The hard prompt template as the variant uses it (with the reference's quirk when switched on)."""
        o = self.options
        return underscore_template(o.template) if o.underscore_prompts and o.tune == "encoder" else o.template

    def set_classes(self, names: list[str]) -> None:
        """Use ``names`` as the label space; fixed class features are computed here, once."""
        self.class_names = list(names)
        if self.context is not None:
            _, after = split_template(self.options.template)
            self.class_tokens = self.tokenize([n + after for n in names])
            self.frozen_class_feats = None
        else:
            self.class_tokens = self.backbone.tokenize(format_prompts(names, self.hard_template))
            with torch.no_grad():
                self.frozen_class_feats = self.text_features()

    def plans(self) -> Plans:
        return Plans(text=PromptPlan(replace={0: self.context()})) if self.context is not None else Plans()

    def text_features(self) -> Tensor:
        """L2-normalised class features ``[C, E]`` under the current context."""
        if self.class_tokens is None:
            raise RuntimeError("call set_classes() before adapting")
        plan = self.plans().text
        out = self.backbone.text(self.class_tokens, plan, return_tokens=not self.truncate_text).pooled
        return F.normalize(out, dim=-1)

    def class_features(self) -> Tensor:
        """Class features: fixed ones for the encoder variant, recomputed (with grad) for the prompt variant."""
        return self.frozen_class_feats if self.frozen_class_feats is not None else self.text_features()

    @property
    def scale(self) -> Tensor | float:
        return self.options.logit_scale or self.backbone.logit_scale.detach()

    def logits(self, image_feats: Tensor, class_feats: Tensor) -> Tensor:
        """``scale * cos`` between images and classes, ``[B, C]``."""
        return self.scale * image_feats @ class_feats.t()

    def encode_views(self, views: Tensor) -> Tensor:
        """L2-normalised image features of views ``[B, 3, S, S]``."""
        return F.normalize(self.backbone.encode_image(views), dim=-1)

    # ---- the episode ---------------------------------------------------------------------------
    def begin(self, views: Tensor, keep: float, adapt: bool = True) -> Episode:
        """Start a sample: select the confident views at the initial parameters (no grad where none is needed)."""
        ep = Episode(views)
        if self.context is not None:
            with torch.no_grad():
                ep.image_feats = self.encode_views(views)  # the image tower is frozen: once per sample
            if adapt:
                logits = self.logits(ep.image_feats, self.class_features())  # with graph: step 0 reuses it
                ep.selected = confident_views(logits.detach(), keep)
                ep.first_logits = logits[ep.selected]
                ep.before = logits[0].detach().float()  # view 0 = the centre crop, what predict() reads
        elif adapt:
            with torch.no_grad():  # selection pass on all views; the grad pass then runs on the selected only
                logits = self.logits(self.encode_views(views), self.class_features())
                ep.selected = confident_views(logits, keep)
                ep.before = logits[0].float()
        if adapt:
            self.on_selected(ep)
        return ep

    def on_selected(self, ep: Episode) -> None:
        """Hook after selection (RLCF caches the reward features of the selected views here)."""

    def step_logits(self, ep: Episode, step: int) -> Tensor:
        """Logits ``[S, C]`` of the selected views under the current parameters."""
        if step == 0 and ep.first_logits is not None:
            logits, ep.first_logits = ep.first_logits, None
            return logits
        if ep.image_feats is not None:
            return self.logits(ep.image_feats[ep.selected], self.class_features())
        return self.logits(self.encode_views(ep.views[ep.selected]), self.class_features())

    def loss(self, ep: Episode, step: int) -> Tensor:
        """The adaptation loss of step ``step``."""
        return self.objective(ep, self.step_logits(ep, step))

    def objective(self, ep: Episode, logits: Tensor) -> Tensor:
        """The loss given the selected views' logits ``[S, C]`` (what each method defines)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, ep: Episode) -> Tensor:
        """Logits ``[C]`` of the centre view under the adapted parameters."""
        image = ep.image_feats[:1] if ep.image_feats is not None else self.encode_views(ep.views[:1])
        return self.logits(image, self.class_features())[0].float()


@register_method("tpt")
class TPT(ClassificationTTA):
    """Minimise the entropy of the mean prediction over the confident views."""

    def objective(self, ep: Episode, logits: Tensor) -> Tensor:
        return marginal_entropy(logits)
