"""S-Prompts-style per-task prompts (Wang et al., NeurIPS 2022) for retrieval, and sequential fine-tuning.

``sprompts``: one full-rank prompt pair per task (vision ``[N, Dv]`` inserted after CLS, text ``[N, Dt]`` replacing
``N`` placeholder words; N(0, 0.02²)), CLIP loss only, K-means routing at test time: LPI's ``NormalPrompt``
baseline, re-implemented because the released one does not run (spec section 5). ``seqft``: the same prompt
shape, one set shared by every task and trained on each task in turn (the forgetting reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vlprompt.backbone import Backbone
from vlprompt.methods.base import Plans, register_method
from vlprompt.methods.continual import ContinualMethod, TaskPromptMethod, prompt_pair_plans
from vlprompt.options import count, nonneg
from vlprompt.prompts.lpi import FullRankPrompt


@dataclass
class SPromptsOptions:
    num_tasks: int = nonneg(0)  # set from the task sequence by the continual runner (0 = 1 task when built alone)
    n_tokens: int = count(16)
    init_std: float = nonneg(0.02)
    n_keys: int = count(5)  # K-means keys per task per modality
    insert_before_ln_pre: bool = True  # vision prompts enter before ln_pre (LPI's code); False = after (VPT)
    text_keys_with_placeholders: bool = False  # True: keys from the "X X ... caption" string, as LPI's code
    caption_suffix: str = "."  # appended to every caption, as LPI's code (which holds this baseline) does


@register_method("sprompts")
class SPrompts(TaskPromptMethod):
    """A prompt pair per task; only the current task's pair trains; images and captions route independently."""

    Options = SPromptsOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        self.prompts = nn.ModuleList(
            FullRankPrompt(1, o.n_tokens, backbone.vision_width, backbone.text_width, o.init_std)
            for _ in range(self.num_tasks)
        )
        self.n_placeholders = o.n_tokens
        self.caption_suffix = o.caption_suffix
        self.begin_task(0)


@dataclass
class SeqFTOptions:
    num_tasks: int = nonneg(0)
    n_tokens: int = count(16)
    init_std: float = nonneg(0.02)
    insert_before_ln_pre: bool = True
    caption_suffix: str = "."  # as S-Prompts


@register_method("seqft")
class SequentialFinetune(ContinualMethod):
    """One S-Prompts-shaped prompt pair shared by all tasks, trained on each task in turn; no routing."""

    Options = SeqFTOptions

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__(backbone, options)
        o = self.options
        self.prompt = FullRankPrompt(1, o.n_tokens, backbone.vision_width, backbone.text_width, o.init_std)
        self.n_placeholders = o.n_tokens
        self.caption_suffix = o.caption_suffix

    def plans(self) -> Plans:
        return prompt_pair_plans(*self.prompt(), before_ln_pre=self.options.insert_before_ln_pre)
