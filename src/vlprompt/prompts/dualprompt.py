"""Prefix prompts of the L2P family on the image tower: task-indexed prompts with keys, and DualPrompt's G + E prompts.

Every prompt here is a *prefix* (prefix tuning, as DualPrompt, CODA-Prompt, HiDe-Prompt and, per the spec, IT-Prompt):
one entry is a tensor ``[L, 2, n, D]`` holding, for each of ``L`` prompted layers, ``n`` key tokens and ``n`` value
tokens in the attention's projected space (HiDe's ``[layers, 2, length, heads, head_dim]`` with the heads merged).
:func:`prefix_plan` turns a batch of them into the backbone's ``PromptPlan(prefix=...)``; queries still come only
from the image tokens, so the output length is unchanged.

:class:`TaskPrefixPrompts` keeps one entry (and optionally one key) *per task* as separate parameters, so that
training task ``t`` can leave every other task's prompt untouched bit for bit (only ``t``'s parameters require grad).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.backbone import PromptPlan


def init_prompt(shape: Sequence[int], how: str = "uniform") -> Tensor:
    """A prompt tensor: ``uniform`` U(-1, 1) (L2P/DualPrompt/HiDe), ``zero``, ``normal`` (std 0.02), ``normal:STD``."""
    t = torch.empty(*shape)
    if how == "uniform":
        return nn.init.uniform_(t, -1.0, 1.0)
    if how == "zero":
        return nn.init.zeros_(t)
    if how.startswith("normal"):
        return nn.init.normal_(t, std=float(how.split(":", 1)[1]) if ":" in how else 0.02)
    raise ValueError(f"unknown prompt init {how!r}; use uniform, zero, normal or normal:STD")


def prefix_plan(layers: Sequence[int], prefix: Tensor) -> PromptPlan:
    """``PromptPlan(prefix={layer: (keys, values)})`` from ``prefix [B or 1, L, 2, n, D]`` (one slot per layer)."""
    if prefix.dim() != 5 or prefix.shape[1] != len(layers) or prefix.shape[2] != 2:
        raise ValueError(f"prefix must be [B, {len(layers)}, 2, n, D], got {tuple(prefix.shape)}")
    return PromptPlan(prefix={layer: (prefix[:, i, 0], prefix[:, i, 1]) for i, layer in enumerate(layers)})


def merge_plans(*plans: PromptPlan) -> PromptPlan:
    """One plan whose prefix at each layer concatenates the given plans' prefixes (in argument order)."""
    prefix: dict[int, tuple[Tensor, Tensor]] = {}
    for plan in plans:
        for layer, (k, v) in plan.prefix.items():
            if layer in prefix:
                k0, v0 = prefix[layer]
                batch = max(k0.shape[0], k.shape[0])
                k = torch.cat([k0.expand(batch, -1, -1), k.expand(batch, -1, -1)], dim=1)
                v = torch.cat([v0.expand(batch, -1, -1), v.expand(batch, -1, -1)], dim=1)
            prefix[layer] = (k, v)
    return PromptPlan(prefix=prefix)


class TaskPrefixPrompts(nn.Module):
    """One prefix ``[L, 2, n, D]`` per task and, with ``key_dim``, one key ``[key_dim]`` per task."""

    def __init__(self, num_tasks: int, num_layers: int, length: int, width: int, key_dim: int = 0,
                 init: str = "uniform") -> None:  # fmt: skip
        super().__init__()
        if num_tasks < 1 or num_layers < 1 or length < 1:
            raise ValueError("task prompts need at least one task, one layer and one token")
        shape = (num_layers, 2, length, width)
        self.prompts = nn.ParameterList([nn.Parameter(init_prompt(shape, init)) for _ in range(num_tasks)])
        self.keys = nn.ParameterList([nn.Parameter(init_prompt((key_dim,), init)) for _ in range(num_tasks)]) \
            if key_dim else None  # fmt: skip

    @property
    def num_tasks(self) -> int:
        return len(self.prompts)

    def gather(self, tasks: Tensor) -> Tensor:
        """The prefixes of ``tasks [B]``: ``[B, L, 2, n, D]``. Depends only on the task ids, never on the input."""
        return torch.stack(list(self.prompts))[tasks.to(self.prompts[0].device)]

    def key_similarity(self, query: Tensor, num_seen: int) -> Tensor:
        """Cosine ``[B, num_seen]`` of queries to the keys of tasks ``0 .. num_seen - 1``."""
        if self.keys is None:
            raise RuntimeError("these task prompts have no keys")
        keys = torch.stack(list(self.keys)[:num_seen])
        return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T

    def train_only(self, task: int) -> None:
        """Only task ``task``'s prompt (and key) require grad: every other task's entry stays bit-identical."""
        for j, p in enumerate(self.prompts):
            p.requires_grad_(j == task)
        for j, k in enumerate(self.keys or []):
            k.requires_grad_(j == task)

    @torch.no_grad()
    def copy_previous(self, task: int) -> None:
        """Start task ``task``'s prompt (and key) from task ``task - 1``'s (HiDe's ``shared_prompt_pool``)."""
        if task > 0:
            self.prompts[task].copy_(self.prompts[task - 1])
            if self.keys is not None:
                self.keys[task].copy_(self.keys[task - 1])

    @torch.no_grad()
    def blend_with_previous(self, task: int, momentum: float) -> None:
        """HiDe's prompt momentum on the *new* prompt: ``P_t <- (1 - m) P_t + m mean_{j<t} P_j``."""
        if task > 0 and momentum > 0:
            previous = torch.stack(list(self.prompts)[:task]).mean(dim=0)
            self.prompts[task].mul_(1.0 - momentum).add_(momentum * previous)


class DualPromptPrompts(nn.Module):
    """DualPrompt: a shared G-prompt in ``g_layers`` plus per-task E-prompts (with keys) in ``e_layers``."""

    def __init__(self, num_tasks: int, g_layers: Sequence[int], e_layers: Sequence[int], g_length: int,
                 e_length: int, width: int, key_dim: int, init: str = "uniform") -> None:  # fmt: skip
        super().__init__()
        self.g_layers, self.e_layers = list(g_layers), list(e_layers)
        if not self.e_layers:
            raise ValueError("DualPrompt needs at least one E-prompt layer")
        use_g = bool(self.g_layers) and g_length > 0
        self.g = nn.Parameter(init_prompt((len(self.g_layers), 2, g_length, width), init)) if use_g else None
        self.e = TaskPrefixPrompts(num_tasks, len(self.e_layers), e_length, width, key_dim, init)

    def plan(self, tasks: Tensor) -> PromptPlan:
        """E-prompts of ``tasks [B]`` then the G-prompt (DualPrompt's order), concatenated where layers coincide."""
        e_plan = prefix_plan(self.e_layers, self.e.gather(tasks))
        if self.g is None:
            return e_plan
        return merge_plans(e_plan, prefix_plan(self.g_layers, self.g.unsqueeze(0)))
