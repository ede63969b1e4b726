"""Loading open_clip models: architecture name + pretrained tag, local file, hub id, or embedded tiny CLIP.

Nothing here downloads silently into a stack trace: when weights are missing and cannot be fetched,
:class:`~vlprompt.errors.WeightsUnavailableError` says what to download and where to put it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import open_clip
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from vlprompt.backbone.embedded import is_embedded_file, load_embedded_weights
from vlprompt.errors import WeightsUnavailableError
from vlprompt.run_layout import RUN_CONFIG, RUN_RESULTS, WEIGHTS, latest_checkpoint
from vlprompt.safe_pickle import torch_refusal

CONFIG_DIR = Path(__file__).parent / "model_configs"
#: Models pretrained by ``vlprompt pretrain`` on the embedded world (see docs/embedded_world.md).
EMBEDDED_MODELS = ("vlprompt-tiny", "vlprompt-small")
#: The pretrained tag that selects the embedded world's weights for an embedded model.
EMBEDDED_TAG = "world"

#: Where a method's checkpoint keeps the CLIP's own tensors (``Method.backbone`` -> ``Backbone.model``).
RUN_MODEL_PREFIX = "backbone.model."

logger = logging.getLogger(__name__)
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


def is_run_directory(path: str | Path) -> bool:
    """True for a folder holding a run's resolved ``config.yaml`` (what ``vlprompt train`` writes)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / RUN_CONFIG).is_file()


def run_backbone(run_dir: str | Path) -> tuple[str, str | None]:
    """The backbone a run started from: its config's ``backbone.name`` and ``backbone.pretrained``."""
    config = OmegaConf.load(Path(run_dir).expanduser() / RUN_CONFIG)  # plain YAML (OmegaConf's safe loader)
    section = config.get("backbone") or {}
    return str(section.get("name") or ""), section.get("pretrained") or None


def run_model_tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The CLIP tensors a run trained: its latest checkpoint's ``backbone.model.*`` tensors under open_clip's names.

    A full fine-tuning run (method ``finetune``) holds every CLIP weight; a prompt method's run holds none, which
    is an error: its backbone is the one it started from (:func:`run_backbone`).
    """
    run_dir = Path(run_dir).expanduser()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise WeightsUnavailableError(
            f"run directory {run_dir} has no checkpoint to take backbone weights from (did its training finish?)"
        )
    if not (run_dir / RUN_RESULTS).is_file():  # a killed run's checkpoint is from the middle of its training
        raise WeightsUnavailableError(
            f"run directory {run_dir} has not finished (no {RUN_RESULTS}): its checkpoint {checkpoint.name} is from "
            "the middle of training. Finish it first (the same command with resume=true)"
        )
    tensors = load_file(str(checkpoint / WEIGHTS))
    clip = {k.removeprefix(RUN_MODEL_PREFIX): v for k, v in tensors.items() if k.startswith(RUN_MODEL_PREFIX)}
    if not clip:
        name, pretrained = run_backbone(run_dir)
        raise WeightsUnavailableError(
            f"run directory {run_dir} trained no CLIP weights (its checkpoint holds only {sorted(tensors)[:3]}...), "
            f"so it cannot serve as a backbone: its backbone is the unchanged {name} / {pretrained}. Fully fine-tune "
            "first (method.name=finetune, e.g. `vlprompt pretrain CONFIG`), then pass that run directory"
        )
    if other := sorted(set(tensors) - {RUN_MODEL_PREFIX + k for k in clip}):
        logger.warning(
            "%s: using its trained CLIP weights as a backbone; its %d other trained tensors (%s...) are not part of "
            "the backbone and are left out",
            run_dir,
            len(other),
            ", ".join(other[:3]),
        )
    return clip


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Turn ``pretrained`` into something open_clip accepts: None (random init), a tag or a file path (run
    directories are read by :func:`create_clip`)."""
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
    if path.is_dir():
        raise WeightsUnavailableError(
            f"backbone.pretrained={pretrained} is a folder but not a run directory (no {RUN_CONFIG}); give a "
            "checkpoint file, a run directory of `vlprompt train`/`pretrain`, an open_clip tag, or null"
        )
    if path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or path.exists():
        if not path.exists():
            raise WeightsUnavailableError(f"checkpoint file {path} does not exist")
        return str(path)
    return pretrained


def create_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32"):
    """Build an open_clip model and its transforms; returns ``(model, preprocess_train, preprocess_val)``.

    ``pretrained`` may also be a run directory: the backbone that run started from, with the CLIP weights it
    trained on top (:func:`run_model_tensors`), so "fine-tune fully, then prompt-tune" needs no export step.
    """
    return _create_clip(name, pretrained, device, precision, ())


def _create_clip(name: str, pretrained: str | None, device: str | torch.device, precision: str, chain: tuple):
    if pretrained and is_run_directory(pretrained):
        return _create_from_run(name, Path(pretrained).expanduser(), device, precision, chain)
    register_model_configs()
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `vlprompt list backbones`."
        raise WeightsUnavailableError(f"unknown backbone architecture {name!r}.{hint}")
    weights = resolve_pretrained(name, pretrained)
    embedded = weights is not None and is_embedded_file(weights)
    offline = hub_offline_reason() if _uses_hub(name, weights) else None
    try:
        with _no_random_init_warning(embedded or weights is None), hub_offline_mode(offline is not None):
            created = open_clip.create_model_and_transforms(
                name, pretrained=None if embedded else weights, device=device, precision=precision
            )
    except Exception as err:  # open_clip surfaces download and unpickling failures as many exception types
        note = f" (Offline: {offline}, so only the local cache was looked in.)" if offline else ""
        raise WeightsUnavailableError(_missing_weights_message(name, weights, err) + note) from err
    if embedded:
        load_embedded_weights(created[0], Path(weights))
    return created


def _create_from_run(name: str, run_dir: Path, device: str | torch.device, precision: str, chain: tuple):
    """The model of run directory ``run_dir``: its starting backbone (possibly a run too) plus its trained tensors."""
    if run_dir.resolve() in chain:
        raise WeightsUnavailableError(f"backbone.pretrained chain of run directories loops back to {run_dir}")
    base_name, base_pretrained = run_backbone(run_dir)
    if base_name != name:
        raise WeightsUnavailableError(
            f"run directory {run_dir} trained backbone {base_name!r}, not {name!r}: set backbone.name={base_name}"
        )
    tensors = run_model_tensors(run_dir)
    created = _create_clip(name, base_pretrained, device, precision, (*chain, run_dir.resolve()))
    own = created[0].state_dict()
    if bad := [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]:
        raise WeightsUnavailableError(f"run directory {run_dir}: its trained tensors do not fit {name}: {bad[:5]}")
    created[0].load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in tensors.items()}, strict=False)
    return created


def save_open_clip_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model``'s full state dict as safetensors under open_clip's names: a file that
    ``open_clip.create_model_and_transforms(name, pretrained=path)`` and ``backbone.pretrained=path`` load."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


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


# ---- offline: fail at once instead of a minute of hub retries ----------------------------------------------
#: Seconds the one reachability check of the Hugging Face Hub may take (per process).
HUB_CHECK_SECONDS = 3.0
_TRUE = ("1", "on", "yes", "true")


def _uses_hub(name: str, weights: str | None) -> bool:
    """True when creating ``name`` with ``weights`` downloads from the Hugging Face Hub (or its cache)."""
    if name.startswith("hf-hub:"):
        return True
    if weights is None or Path(weights).exists():
        return False
    return bool(open_clip.get_pretrained_cfg(name, weights))  # an unknown tag fails without any download


def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set
    (read now, not at import), or the hub did not answer within :data:`HUB_CHECK_SECONDS`."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    endpoint = _hub_endpoint()
    if not _hub_answers(endpoint):
        return f"the Hugging Face Hub ({endpoint}) did not answer within {HUB_CHECK_SECONDS:g} s"
    return None


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "https://huggingface.co"
    return constants.ENDPOINT


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str) -> bool:
    """One HEAD request (proxies from the environment apply): any HTTP answer means the hub is reachable."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_CHECK_SECONDS).close()
    except urllib.error.HTTPError:
        return True  # an error status is still an answer
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def hub_offline_mode(active: bool):
    """huggingface_hub's offline mode while ``active``: the local cache only, no requests and no retries, so a
    missing file fails at once (its own switch, ``HF_HUB_OFFLINE``, is read only when it is imported)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        active = False
    if not active:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


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
