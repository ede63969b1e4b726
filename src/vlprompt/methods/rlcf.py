"""RLCF (Zhao et al., ICLR 2024): test-time adaptation with CLIP feedback, for classification and retrieval.

The policy (the model being adapted) proposes its top-K candidates (classes, captions or images) for an input;
a frozen, larger CLIP scores each candidate, ``2.5 * max(cos, 0)``; the reward is that score minus its mean over
the K candidates; the loss is REINFORCE with the deterministic top-K, ``mean_{s,k} r[s,k] * CE(z_s, a_{s,k})``.
Since the rewards of one input sum to zero, ``d loss / d z_s = -(1 / (S K)) sum_k r[s,k] onehot(a_{s,k})``.

- ``rlcf``: classification (TPT's views and confident-view selection, prompt or image-encoder tuning).
- ``rlcf_retrieval``: image->text (tunes the image tower) or text->image (tunes the text tower and the
  temperature, as the reference does), one query at a time against cached candidate features.

Several reward models with weights give RLCF-S (the paper's confidences {L/14@336: 10, RN50x64: 3, L/14: 5},
normalised and rounded to two decimals); RLCF-S-M adds the TTA runner's momentum weight averaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import Backbone, PromptPlan
from vlprompt.data.classnames import format_prompts
from vlprompt.errors import ConfigError
from vlprompt.methods.base import Method, register_method
from vlprompt.methods.tpt import ClassificationTTA, Episode, TPTOptions
from vlprompt.options import count, ranged

CLIPSCORE_WEIGHT = 2.5


def reward_weights(confidences: Sequence[float], n_models: int) -> list[float]:
    """Ensemble weights: confidences normalised and rounded to 2 decimals as the paper does; equal when empty."""
    if not confidences:
        return [round(1.0 / n_models, 2)] * n_models if n_models > 1 else [1.0]
    if len(confidences) != n_models:
        raise ConfigError(f"{len(confidences)} reward weights for {n_models} reward models")
    if n_models == 1:
        return [1.0]
    total = float(sum(confidences))
    return [round(c / total, 2) for c in confidences]


def baseline_rewards(scores: Tensor) -> Tensor:
    """Scores ``[S, K]`` minus their mean over the K candidates (raw scores when K = 1)."""
    return scores - scores.mean(dim=-1, keepdim=True) if scores.shape[-1] > 1 else scores


def reinforce_loss(logits: Tensor, candidates: Tensor, rewards: Tensor) -> Tensor:
    """``mean_{s,k} r[s,k] * CE(logits[s], candidates[s,k])`` for logits ``[S, C]``, candidates/rewards ``[S, K]``."""
    nll = -logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1).gather(1, candidates)
    return (rewards.detach() * nll).mean()


class RewardEncoder(nn.Module):
    """One frozen reward CLIP: any open_clip model (ViT or ResNet image tower), its tokenizer and input facts."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        text_tower: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size, self.image_mean, self.image_std = image_size, tuple(mean), tuple(std)
        # The backbone's promptable text tower over the same modules (not registered again: one set of weights in
        # the module tree): it drops the padding after the last end-of-text, so short captions cost a few tokens.
        self.__dict__["text_tower"] = text_tower

    @classmethod
    def from_backbone(cls, b: Backbone) -> RewardEncoder:
        return cls(b.model, b.tokenizer, b.image_size, b.image_mean, b.image_std, b.text)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def encode_image(self, images: Tensor) -> Tensor:
        # reduced-precision weights (backbone.precision bf16, fp16...) take the images in their own dtype, as the
        # policy's tower does; open_clip's encode_image does not cast them
        conv = next((m for m in self.model.visual.modules() if isinstance(m, nn.Conv2d)), None)
        return self.model.encode_image(images if conv is None else images.to(conv.weight.dtype))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        if self.text_tower is not None:
            return self.text_tower(tokens).pooled
        return self.model.encode_text(tokens)


class RewardCLIP(nn.Module):
    """Frozen reward CLIPs and their weights; every feature is L2-normalised fp32 and computed without grad."""

    def __init__(self, models: Sequence[RewardEncoder | Backbone], weights: Sequence[float] = ()) -> None:
        super().__init__()
        encoders = [m if isinstance(m, RewardEncoder) else RewardEncoder.from_backbone(m) for m in models]
        self.models = nn.ModuleList(encoders)
        self.weights = reward_weights(weights, len(encoders))

    @torch.no_grad()
    def image_features(self, images: Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Tensor]:
        """Features of policy-normalised images ``[B, 3, S, S]``, resized (bicubic, align_corners) per model."""
        out = []
        for m in self.models:
            x = images.to(m.device)
            if m.image_mean != tuple(mean) or m.image_std != tuple(std):
                x = x * _col(std, x) + _col(mean, x)
                x = (x - _col(m.image_mean, x)) / _col(m.image_std, x)
            if x.shape[-1] != m.image_size:
                x = F.interpolate(x, size=m.image_size, mode="bicubic", align_corners=True)
            out.append(F.normalize(m.encode_image(x).float(), dim=-1))
        return out

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch_size: int = 1024) -> list[Tensor]:
        """Features of texts, tokenised by each reward model's own tokenizer."""
        texts = list(texts)
        return [
            F.normalize(
                torch.cat(
                    [m.encode_text(texts[i : i + batch_size]).float() for i in range(0, len(texts), batch_size)]
                ),
                dim=-1,
            )  # fmt: skip
            for m in self.models
        ]

    @torch.no_grad()
    def score(self, query: list[Tensor], candidates: list[Tensor], index: Tensor) -> Tensor:
        """``sum_m w_m * 2.5 * max(cos(query_m[s], candidates_m[index[s, k]]), 0)``, shape ``[S, K]``."""
        total = 0.0
        for w, q, c in zip(self.weights, query, candidates):
            cos = (c[index.to(c.device)] * q.unsqueeze(1)).sum(-1)
            total = total + w * CLIPSCORE_WEIGHT * cos.clamp(min=0)
        return total


def _col(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


@dataclass
class RewardOptions:
    reward: list[str] = field(default_factory=lambda: ["vlprompt-small"])  # reward CLIPs (several = RLCF-S)
    reward_pretrained: list[str] = field(default_factory=lambda: ["world"])  # one tag per model, or one for all
    reward_weights: list[float] = ranged(factory=list, gt=0)  # confidences per model ([] = equal)
    sample_k: int = count(3)  # K candidates per input (top-K of the policy)


def reward_specs(o: RewardOptions) -> list[tuple[str, str | None]]:
    """``(name, pretrained)`` of every reward model."""
    tags = list(o.reward_pretrained) or [None]
    if len(tags) == 1:
        tags = tags * len(o.reward)
    if len(tags) != len(o.reward):
        raise ConfigError(f"{len(o.reward_pretrained)} reward_pretrained tags for {len(o.reward)} reward models")
    return [(n, None if t in (None, "", "none", "null") else t) for n, t in zip(o.reward, tags)]


@dataclass
class RLCFOptions(TPTOptions, RewardOptions):
    """TPT's options plus the reward models and K."""


@register_method("rlcf")
class RLCF(ClassificationTTA):
    """Classification RLCF: rewards from the reward CLIP on the confident views' top-K classes."""

    Options = RLCFOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        if self.options.sample_k < 1:
            raise ConfigError(f"sample_k must be >= 1, got {self.options.sample_k}")
        self.reward: RewardCLIP | None = None
        self._reward_text: dict[tuple[str, ...], list[Tensor]] = {}

    def reward_specs(self) -> list[tuple[str, str | None]]:
        return reward_specs(self.options)

    def attach_reward(self, reward: RewardCLIP) -> None:
        """Give the method its (frozen) reward models; kept outside the module tree so nothing saves or tunes it."""
        self.__dict__["reward"] = reward

    def set_classes(self, names: list[str]) -> None:
        super().set_classes(names)
        if self.reward is None:
            raise RuntimeError("attach_reward() before set_classes()")
        # the reward encodes the policy's hard prompts; cached per class list (one forward per run)
        prompts = tuple(format_prompts(names, self.hard_template))
        if prompts not in self._reward_text:
            self._reward_text[prompts] = self.reward.text_features(prompts)
        self.reward_text = self._reward_text[prompts]

    def on_selected(self, ep: Episode) -> None:
        b = self.backbone
        ep.extra["reward_image"] = self.reward.image_features(ep.views[ep.selected], b.image_mean, b.image_std)

    def objective(self, ep: Episode, logits: Tensor) -> Tensor:
        k = min(self.options.sample_k, logits.shape[-1])
        candidates = logits.detach().topk(k, dim=-1).indices
        scores = self.reward.score(ep.extra["reward_image"], self.reward_text, candidates)
        return reinforce_loss(logits, candidates, baseline_rewards(scores).to(logits.device))


@dataclass
class RLCFRetrievalOptions(RewardOptions):
    direction: str = "i2t"  # i2t: tune the image tower per image query | t2i: tune the text tower per caption
    sample_k: int = count(20)  # reference: i2t 20 (COCO) / 16 (Flickr), t2i 12
    # t2i: train only the query's token-embedding rows. The other rows get no gradient and are never read before
    # the restore, so predictions are the same as tuning the whole table, at a fraction of the optimizer work;
    # momentum averaging (RLCF-S-M) needs the whole table (weight decay moves every row), so turn it off there.
    embedding_rows: bool = True


@register_method("rlcf_retrieval")
class RLCFRetrieval(Method):
    """Retrieval RLCF: one query at a time against all candidates, whose features are computed once."""

    Options = RLCFRetrievalOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        if o.direction not in ("i2t", "t2i"):
            raise ConfigError(f"direction must be 'i2t' or 't2i', got {o.direction!r}")
        for name, p in backbone.model.named_parameters():
            # i2t tunes every visual parameter; t2i every other one, the temperature included (as the reference)
            p.requires_grad_(name.startswith("visual.") == (o.direction == "i2t"))
        self.rows: nn.Parameter | None = None
        if o.direction == "t2i" and o.embedding_rows:
            table = backbone.text.src.token_embedding.weight
            table.requires_grad_(False)
            self.rows = nn.Parameter(torch.zeros(backbone.context_length, table.shape[1], dtype=table.dtype))
        self.reward: RewardCLIP | None = None
        #: the reference runs caption queries at the full context length; benchmarks switch this off to replay it
        self.truncate_text = True
        self.candidates: Tensor | None = None
        self.reward_candidates: list[Tensor] = []

    def reward_specs(self) -> list[tuple[str, str | None]]:
        return reward_specs(self.options)

    def attach_reward(self, reward: RewardCLIP) -> None:
        self.__dict__["reward"] = reward

    @property
    def scale(self) -> Tensor:
        return self.backbone.model.logit_scale.exp()

    def set_candidates(self, features: Tensor, reward_features: list[Tensor]) -> None:
        """Normalised policy features ``[M, E]`` of the candidates and the reward models' features of them."""
        self.candidates = features
        self.reward_candidates = reward_features

    def encode_query(self, query: Tensor) -> Tensor:
        """Policy features of an image ``[1, 3, S, S]`` (i2t) or token ids ``[1, L]`` (t2i), with grad if tuned."""
        if self.options.direction == "i2t":
            return F.normalize(self.backbone.encode_image(query), dim=-1)
        plan = None
        if self.rows is not None:  # the query's embedding rows, gathered back into token order
            plan = PromptPlan(replace={0: self.rows[self._inverse]}, start=0)
        return F.normalize(self.backbone.text(query, plan, return_tokens=not self.truncate_text).pooled, dim=-1)

    def begin(self, query: Tensor, reward_query: list[Tensor]) -> Episode:
        """A query's episode; ``reward_query`` holds its reward features (one row per model)."""
        if self.rows is not None:
            if self.truncate_text:  # causal attention: nothing after end-of-text reaches the pooled token
                query = query[:, : int(self.backbone.text.pool_positions(query).max()) + 1]
            ids, self._inverse = torch.unique(query, return_inverse=True)
            with torch.no_grad():
                self.rows[: len(ids)].copy_(self.backbone.text.src.token_embedding.weight[ids])
        return Episode(query, extra={"reward_query": reward_query})

    def loss(self, ep: Episode, step: int) -> Tensor:
        """The adaptation loss of step ``step``: the query against every candidate."""
        logits = self.scale * self.encode_query(ep.views) @ self.candidates.t()
        if step == 0:  # the start point's ranking (the scale does not change it): the TTA gain's baseline
            ep.before = logits.detach()[0].float()
        return self.objective(ep, logits)

    def objective(self, ep: Episode, logits: Tensor) -> Tensor:
        """REINFORCE over the top-K candidates of the query's logits ``[1, M]``."""
        k = min(self.options.sample_k, logits.shape[-1])
        candidates = logits.detach().topk(k, dim=-1).indices
        scores = self.reward.score(ep.extra["reward_query"], self.reward_candidates, candidates)
        return reinforce_loss(logits, candidates, baseline_rewards(scores).to(logits.device))

    @torch.no_grad()
    def predict(self, ep: Episode) -> Tensor:
        """Similarities ``[M]`` of the query to every candidate after adaptation (ranking is scale-free)."""
        return (self.encode_query(ep.views) @ self.candidates.t())[0].float()
