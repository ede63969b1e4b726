"""Batch collation that tolerates samples whose media failed to load."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import default_collate


def collate_skip_none(batch: Sequence[Any]) -> Any | None:
    """Drop ``None`` samples, then ``default_collate``; returns None when every sample in the batch failed."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None
