"""vlprompt: adapt CLIP-style vision-language models to retrieval with few trainable parameters.

The public API: a backbone (:func:`load_backbone`, :class:`Backbone`, :class:`PromptPlan`), a method from a config
(:func:`load_config`, :func:`build_model`; :func:`vlprompt.methods.build_method` for a section alone) and a trained
method as a shareable folder (:func:`from_pretrained`, :func:`save_pretrained`). The layers behind it are drawn in
``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlprompt.backbone import Backbone, PromptPlan, load_backbone
from vlprompt.version import __version__

if TYPE_CHECKING:
    import torch

    from vlprompt.config import Config
    from vlprompt.methods import Method

__all__ = [
    "Backbone",
    "PromptPlan",
    "build_model",
    "from_pretrained",
    "load_backbone",
    "load_config",
    "save_pretrained",
    "__version__",
]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """A typed, range-checked config from YAML and ``key=value`` overrides (:func:`vlprompt.config.load_config`)."""
    from vlprompt.config import load_config as load

    return load(path, list(overrides) or None)


def build_model(cfg: Config, device: str | torch.device = "cpu") -> Method:
    """The config's backbone and method, on ``device`` (:func:`vlprompt.core.factory.build_model`)."""
    import torch

    from vlprompt.core.factory import build_model as build

    return build(cfg, torch.device(device))


def from_pretrained(source: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> Method:
    """A trained method ready to encode, from an exported folder, a run directory or ``hf-hub:ORG/NAME``
    (:func:`vlprompt.core.hub.from_pretrained`)."""
    from vlprompt.core.hub import from_pretrained as load

    return load(source, overrides, device)


def save_pretrained(method: Method, cfg: Config, out_dir: str | Path, **kwargs: Any) -> Path:
    """Write a method's trained tensors and its config as a shareable folder
    (:func:`vlprompt.core.hub.save_pretrained`)."""
    from vlprompt.core.hub import save_pretrained as save

    return save(method, cfg, out_dir, **kwargs)
