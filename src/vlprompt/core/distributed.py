"""Multi-process training under ``torchrun``: process group, per-rank batches, a loss over the global batch.

``torchrun --nproc_per_node N -m vlprompt train CONFIG`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a plain
``vlprompt train`` sees none of them and runs single-process with no launcher. ``train.batch_size`` is the
*global* batch: each rank takes its contiguous share of every global batch, and the contrastive loss gathers the
features of all ranks (open_clip's ``ClipLoss(gather_with_grad=True)``), so the loss and, after DDP's gradient
averaging, the gradients equal a single-process step on the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch import nn

from vlprompt.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, shows progress and evaluates."""
        return self.rank == 0


def from_environment() -> Dist:
    """The launcher's rank and world size (``torchrun`` variables), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(info: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_share(order: list[int], batch_size: int, info: Dist) -> list[int]:
    """This rank's contiguous slice of every global batch of ``order`` (whole global batches only)."""
    if batch_size % info.world_size:
        raise ConfigError(f"train.batch_size {batch_size} is not divisible by the {info.world_size} processes")
    local = batch_size // info.world_size
    start = info.rank * local
    usable = len(order) - len(order) % batch_size
    return [order[b + start + i] for b in range(0, usable, batch_size) for i in range(local)]


def global_batch_loss(info: Dist) -> ClipLoss:
    """The symmetric InfoNCE over the features of every rank (gradients flow back to each rank's own)."""
    return ClipLoss(local_loss=False, gather_with_grad=True, rank=info.rank, world_size=info.world_size)


def wrap(method: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    """``method`` under DistributedDataParallel when several processes run (else unchanged).

    Unused-parameter detection stays on: some methods keep parameters that a step does not reach (e.g. DGL's
    postfix projection in the reference's ``inert`` mode, other tasks' prompts in continual methods).
    """
    if not info.enabled:
        return method
    if hasattr(method, "loss_fn"):
        method.loss_fn = global_batch_loss(info)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=ids, find_unused_parameters=True)


def barrier(info: Dist) -> None:
    """Wait for every rank (no-op single-process)."""
    if info.enabled:
        dist.barrier()
