"""RLCF for captioning (Zhao et al., ICLR 2024, Table 3): per-image test-time tuning of a captioner's mapper.

Per image (RLCF spec section 2c), with the image's policy embedding and its reward-CLIP embedding computed once:
T steps of

1. the prefix from the current mapper (once per step: its output feeds both the beam search, detached, and the
   teacher-forced pass, whose gradient reaches the mapper once instead of K times);
2. beam search with K beams returning K captions, without grad;
3. reward ``2.5 * max(cos, 0)`` of the reward CLIP(s) on (image, caption) (raw captions, no prefix text), minus its
   mean over the K captions; reward text features in one batched call for the captions not seen before for this
   image (a frozen reward gives a caption the same features at every step);
4. the K captions re-tokenised and teacher-forced after the shared prefix in ONE batched pass; per-caption
   token-mean CE (:func:`vlprompt.methods.captioning.caption_losses`); loss ``mean_k r_k * CE_k``;
5. an AdamW step on the mapper (the reference: eps 1e-6, weight decay 0);

then the final caption with ``final_beams`` (5) beams. The TTA runner restores the mapper and the optimizer's state
in place afterwards (``runners.tta.EpisodicState``), as for the other RLCF tasks; several reward models with weights
give RLCF-S, the runner's momentum RLCF-S-M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlprompt.methods.base import register_method
from vlprompt.methods.captioning import CaptionerMethod, CaptionerOptions, caption_losses, teacher_forcing
from vlprompt.methods.rlcf import RewardCLIP, RewardOptions, baseline_rewards, reward_specs
from vlprompt.methods.tpt import Episode
from vlprompt.options import count


@dataclass
class RLCFCaptionOptions(CaptionerOptions, RewardOptions):
    sample_k: int = count(10)  # K beams = K candidates (reference: ClipCap 10 (8 alone), CapDec 6)
    reference_loss_quirks: bool = False  # the reference's CE: BOS target, no eos, pads counted (OPT's pad is 1)


@register_method("rlcf_caption")
class RLCFCaption(CaptionerMethod):
    """Captioning RLCF: ``begin`` (one image) -> ``loss`` per step -> ``predict`` (the caption)."""

    Options = RLCFCaptionOptions

    def __init__(self, backbone: Any, options: Any = None, captioner: Any = None) -> None:
        super().__init__(backbone, options, captioner)
        self.reward: RewardCLIP | None = None

    def reward_specs(self) -> list[tuple[str, str | None]]:
        return reward_specs(self.options)

    def attach_reward(self, reward: RewardCLIP) -> None:
        """The frozen reward models, kept outside the module tree so nothing saves or tunes them."""
        self.__dict__["reward"] = reward

    def begin(self, image: Tensor, reward_image: list[Tensor] | None = None) -> Episode:
        """One image ``[1, 3, S, S]`` (policy-normalised): its policy embedding and reward features, once."""
        if reward_image is None and self.reward is not None:
            b = self.backbone
            reward_image = self.reward.image_features(image, b.image_mean, b.image_std)
        return Episode(image, extra={"embedding": self.clip_embedding(image), "reward_image": reward_image})

    def candidates(self, prefix: Tensor) -> list[str]:
        """The K beams' captions of one image's prefix (best first)."""
        k = self.options.sample_k
        return self.captioner.generate(prefix, k, k, self.options.max_new_tokens)[0]

    def rewards(self, ep: Episode, captions: list[str]) -> Tensor:
        """Reward-CLIP scores of the captions minus their mean, ``[K]`` (no grad)."""
        if self.reward is None:
            raise RuntimeError("attach_reward() before adapting")
        index = torch.arange(len(captions)).unsqueeze(0)
        scores = self.reward.score(ep.extra["reward_image"], self.reward_text(ep, captions), index)
        return baseline_rewards(scores)[0]

    def reward_text(self, ep: Episode, captions: list[str]) -> list[Tensor]:
        """Each reward model's features of the captions ``[K, D]``. A caption is encoded once per image: the reward
        models are frozen, and the beams of successive steps (and of one step) repeat captions; the new ones go
        through each reward model in one batch."""
        cache: dict[str, list[Tensor]] = ep.extra.setdefault("reward_text", {})
        new = list(dict.fromkeys(c for c in captions if c not in cache))
        if new:
            for caption, *rows in zip(new, *self.reward.text_features(new)):
                cache[caption] = rows
        return [torch.stack([cache[c][m] for c in captions]) for m in range(len(self.reward.models))]

    def loss(self, ep: Episode, step: int) -> Tensor:
        """``mean_k r_k * CE_k`` over the current mapper's K beam captions."""
        prefix = self.captioner.prefix(ep.extra["embedding"])
        captions = self.candidates(prefix)
        rewards = self.rewards(ep, captions).to(prefix.device)
        forcing = teacher_forcing(self.captioner.tokenizer, captions, self.options.reference_loss_quirks)
        ep.extra["captions"] = captions  # the last step's candidates (logs, tests)
        return (rewards * caption_losses(self.captioner, prefix, forcing)).mean()

    @torch.no_grad()
    def predict(self, ep: Episode) -> str:
        """The final caption of the (adapted) mapper: ``final_beams`` beams, the best one."""
        prefix = self.captioner.prefix(ep.extra["embedding"])
        return self.captioner.generate(prefix, self.options.final_beams, 1, self.options.max_new_tokens)[0][0]
