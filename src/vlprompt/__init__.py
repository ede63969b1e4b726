"""vlprompt: adapt CLIP-style vision-language models to retrieval with few trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlprompt.backbone import Backbone, PromptPlan, load_backbone

if TYPE_CHECKING:
    from vlprompt.config import Config
    from vlprompt.methods import Method

__version__ = "0.1.0"
__all__ = ["Backbone", "PromptPlan", "from_pretrained", "load_backbone", "save_pretrained", "__version__"]


def from_pretrained(source: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> Method:
    """A trained method ready to encode, from an exported folder, a run directory or ``hf-hub:ORG/NAME``
    (:func:`vlprompt.engine.hub.from_pretrained`)."""
    from vlprompt.engine.hub import from_pretrained as load

    return load(source, overrides, device)


def save_pretrained(method: Method, cfg: Config, out_dir: str | Path, **kwargs: Any) -> Path:
    """Write a method's trained tensors and its config as a shareable folder
    (:func:`vlprompt.engine.hub.save_pretrained`)."""
    from vlprompt.engine.hub import save_pretrained as save

    return save(method, cfg, out_dir, **kwargs)
