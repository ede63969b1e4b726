"""Loading open_clip models: architecture name + pretrained tag, local file, hub id, or embedded tiny CLIP.

Nothing here downloads silently into a stack trace: when weights are missing and cannot be fetched,
:class:`~vlprompt.errors.WeightsUnavailableError` says what to download and where to put it.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path

import open_clip
import torch

from vlprompt.backbone.embedded import is_embedded_file, load_embedded_weights
from vlprompt.errors import WeightsUnavailableError
from vlprompt.safe_pickle import torch_refusal

CONFIG_DIR = Path(__file__).parent / "model_configs"
#: Models pretrained by ``vlprompt pretrain`` on the embedded world (see docs/embedded_world.md).
EMBEDDED_MODELS = ("vlprompt-tiny", "vlprompt-small")
#: The pretrained tag that selects the embedded world's weights for an embedded model.
EMBEDDED_TAG = "world"

_registered = False


def register_model_configs() -> None:
    """Make vlprompt's own architectures known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def cache_dir() -> Path:
    """Where vlprompt caches pretrained embedded models (``$VLPROMPT_CACHE`` or ``~/.cache/vlprompt``)."""
    root = (
        os.environ.get("VLPROMPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlprompt"
    )
    return Path(root)


def embedded_weights_path(name: str) -> Path:
    """Where the weights of embedded model ``name`` live once pretrained."""
    shipped = Path(__file__).resolve().parents[1] / "assets" / "models" / f"{name}.safetensors"
    return shipped if shipped.exists() else cache_dir() / "models" / f"{name}.safetensors"


def available_backbones() -> list[str]:
    """Architecture names open_clip (plus vlprompt's configs) can build."""
    register_model_configs()
    return open_clip.list_models()


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Turn ``pretrained`` into something open_clip accepts: None (random init), a tag or a file path."""
    if not pretrained:
        return None
    if name in EMBEDDED_MODELS and pretrained == EMBEDDED_TAG:
        path = embedded_weights_path(name)
        if not path.exists():
            raise WeightsUnavailableError(
                f"no pretrained weights for {name!r} at {path}. Create them with "
                f"`vlprompt pretrain --model {name}` (see docs), or use backbone.pretrained=null for random init."
            )
        return str(path)
    path = Path(pretrained).expanduser()
    if path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or path.exists():
        if not path.exists():
            raise WeightsUnavailableError(f"checkpoint file {path} does not exist")
        return str(path)
    return pretrained


def create_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32"):
    """Build an open_clip model and its transforms; returns ``(model, preprocess_train, preprocess_val)``."""
    register_model_configs()
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `vlprompt list backbones`."
        raise WeightsUnavailableError(f"unknown backbone architecture {name!r}.{hint}")
    weights = resolve_pretrained(name, pretrained)
    embedded = weights is not None and is_embedded_file(weights)
    try:
        with _no_random_init_warning(embedded or weights is None):  # weights follow below, or none were asked for
            created = open_clip.create_model_and_transforms(
                name, pretrained=None if embedded else weights, device=device, precision=precision
            )
    except Exception as err:  # open_clip surfaces download and unpickling failures as many exception types
        raise WeightsUnavailableError(_missing_weights_message(name, weights, err)) from err
    if embedded:
        load_embedded_weights(created[0], Path(weights))
    return created


def _missing_weights_message(name: str, tag: str | None, err: Exception) -> str:
    """Say exactly what to download when open_clip could not get weights."""
    if name.startswith("hf-hub:"):
        return (
            f"could not load {name} ({type(err).__name__}: {err}). Download the repository "
            f"{name.removeprefix('hf-hub:')} from the Hugging Face Hub on a machine with internet, copy it to "
            "this machine and pass backbone.name=local-dir:/path/to/that/folder."
        )
    if tag and Path(tag).exists():
        return torch_refusal(Path(tag), "checkpoint", err) or f"could not read checkpoint {tag} for {name}: {err}"
    cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    if tag and not cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == name]
        return f"{name!r} has no pretrained tag {tag!r}; known tags: {', '.join(tags) or '(none)'}"
    source = cfg.get("hf_hub") or cfg.get("url") or "(unknown)"
    return (
        f"pretrained weights {name} / {tag} are not available offline ({type(err).__name__}). Download them from "
        f"{source} (open_clip.pretrained cfg) on a machine with internet, then either place the Hugging Face "
        f"cache under $HF_HOME, or pass backbone.pretrained=/path/to/the/checkpoint file."
    )


@contextlib.contextmanager
def _no_random_init_warning(active: bool):
    """Hide open_clip's "initialized randomly" warning while creating a model whose weights we load next."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
