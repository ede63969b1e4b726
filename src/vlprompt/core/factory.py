"""From a config to a model ready to run: the device, the seeds, the backbone with its method (and a reference
checkpoint to start from), and the input facts the data layer needs from the backbone.

The one place that builds a model from a config: the trainer, evaluation, the runners (continual, class-incremental,
TTA, pretraining), the search index and ``vlprompt export`` / :func:`vlprompt.from_pretrained` all come here.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vlprompt.backbone import Backbone, load_backbone
from vlprompt.config import Config
from vlprompt.core.checkpoint import load_reference_checkpoint
from vlprompt.data.sources import VisualSpec
from vlprompt.methods import Method, build_method, option_names


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def visual_spec(backbone: Backbone) -> VisualSpec:
    """The input facts the data layer needs from a backbone (transforms, size, normalisation)."""
    b = backbone
    return VisualSpec(b.preprocess_train, b.preprocess_val, b.image_size, b.image_mean, b.image_std)


def build_model(cfg: Config, device: torch.device) -> Method:
    """Backbone + method from the config."""
    backbone = load_backbone(
        cfg.backbone.name, cfg.backbone.pretrained, device=device, precision=cfg.backbone.precision
    )
    section = dict(cfg.method)
    if section.get("frames", None) in (None, 0) and "frames" in option_names(section.get("name", "")):
        section["frames"] = cfg.data.num_frames  # video methods with per-frame parameters follow the data
    method = build_method(section, backbone).to(device)
    method.max_words = cfg.data.max_words
    if path := getattr(method.options, "reference_checkpoint", ""):
        load_reference_checkpoint(Path(path), method)
    if cfg.train.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return method
