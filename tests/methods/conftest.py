"""Fixtures the method tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlprompt
from vlprompt.config import DataConfig
from vlprompt.data.features import extract_split_features


@pytest.fixture(scope="session")
def teachers(image_text_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """RVLR teacher feature caches: a frozen random tiny CLIP (another seed than the students) on the train pairs."""
    out = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(1)
    teacher = vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()
    data = DataConfig(root=str(image_text_set), train="train.json")
    extract_split_features(data, "train", "image", out / "image", teacher, "teacher/image", shard_size=5)
    extract_split_features(data, "train", "text", out / "text", teacher, "teacher/text", shard_size=7)
    return out / "image", out / "text"
