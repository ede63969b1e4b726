"""Compact storage of the embedded world's pretrained detector heads (``vlprompt-world-detector``).

The world detector is OWL-ViT's heads (:class:`~vlprompt.backbone.detector.Detector`: ``layer_norm``,
``class_head``, ``box_head``) and the shipped ``vlprompt-tiny`` CLIP (world weights) fine-tuned with them by
:mod:`vlprompt.runners.world_detector` on the world's grounding base part, as OWL-ViT trains its whole model. One
fp16 safetensors file (loaded into the model's dtype) beside the tiny CLIPs in ``assets/models`` (or the vlprompt
cache, :func:`~vlprompt.backbone.loading.embedded_weights_path`) holds the heads under their own names and the CLIP's
tensors under ``clip.``, except the ones training left as shipped (the sparse token table), which the backbone it
started from supplies; that backbone is in the metadata, so the file never lands on other towers. The model card
``vlprompt-world-detector.json`` reports P@1/5/10 measured on exactly this stored form.

``grounding.detector: world`` in a config selects it (:func:`load_world_detector`): its towers replace
``backbone.*``'s and its heads are the detector's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlprompt.backbone.detector import Detector
from vlprompt.backbone.loading import embedded_weights_path
from vlprompt.errors import ConfigError, WeightsUnavailableError

#: The shipped detector's file name (without ``.safetensors``) and model card name (``.json``).
WORLD_DETECTOR = "vlprompt-world-detector"
#: ``grounding.detector`` value that selects the shipped detector.
WORLD_DETECTOR_TAG = "world"
#: The backbone (``backbone.name``, ``backbone.pretrained``) the shipped detector was trained from.
WORLD_DETECTOR_BACKBONE = ("vlprompt-tiny", "world")
#: Where the file keeps the fine-tuned CLIP's tensors (open_clip names after it).
CLIP_PREFIX = "clip."
_KIND = "vlprompt-kind"
_HEADS = "detector-heads"


def world_heads_path(source: str | Path = WORLD_DETECTOR_TAG) -> Path:
    """The heads file of ``source`` (``world``: the shipped one, else a path); a clear error when it is absent."""
    named = str(source) == WORLD_DETECTOR_TAG
    path = embedded_weights_path(WORLD_DETECTOR) if named else Path(source).expanduser()
    if not path.is_file():
        how = (
            "Rebuild it with `python -m vlprompt.runners.world_detector --world WORLD` (docs/embedded_world.md), "
            'or leave grounding.detector="" for new (untrained) heads'
            if named
            else "Give grounding.detector=world or a file written by vlprompt.backbone.world_detector"
        )
        raise WeightsUnavailableError(f"no world detector heads for {str(source)!r} at {path}. {how}")
    return path


def save_world_detector(detector: Detector, path: Path, metadata: dict[str, str], frozen: Sequence[str] = ()) -> None:
    """Write ``detector``'s heads and its CLIP's tensors but ``frozen`` (those stay the backbone's, e.g. the sparse
    token table) as fp16 safetensors; ``metadata`` must name ``backbone`` and ``pretrained`` (the towers it
    started from, which supply the ``frozen`` tensors when it loads)."""
    if not {"backbone", "pretrained"} <= set(metadata):
        raise ValueError("the detector's metadata must name the backbone and pretrained tag it was trained from")
    state = _heads_state(detector)
    state.update({CLIP_PREFIX + k: v for k, v in detector.backbone.model.state_dict().items() if k not in frozen})
    tensors = {k: v.detach().cpu().half().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={**metadata, _KIND: _HEADS})
    tmp.replace(path)


def _heads_state(detector: Detector) -> dict[str, Tensor]:
    return {k: v for k, v in detector.state_dict().items() if not k.startswith("backbone.")}


def heads_metadata(path: Path) -> dict[str, str]:
    """The metadata of a world detector file; a :class:`~vlprompt.errors.ConfigError` for any other file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(_KIND) != _HEADS:
        held = meta.get(_KIND) or "something else"
        raise ConfigError(f"{path} is not a world detector file (it holds {held})")
    return meta


def load_world_detector(detector: Detector, source: str | Path, backbone: tuple[str, str | None]) -> dict[str, str]:
    """Load the world detector ``source`` (``world`` or a file) into ``detector`` in place: its heads, and its
    CLIP tensors into the towers; ``backbone`` = the detector's ``(backbone.name, backbone.pretrained)``, which
    must be the one it was trained from. Returns the file's metadata."""
    path = world_heads_path(source)
    meta = heads_metadata(path)
    trained_on = (meta["backbone"], meta["pretrained"])
    if (backbone[0], str(backbone[1])) != trained_on:
        raise ConfigError(
            f"the world detector {path.name} was trained from backbone {trained_on[0]} / {trained_on[1]}, not "
            f"{backbone[0]} / {backbone[1]}: set backbone.name={trained_on[0]} backbone.pretrained={trained_on[1]}, "
            'or grounding.detector="" for new heads'
        )
    tensors = load_file(str(path))
    clip = {k.removeprefix(CLIP_PREFIX): v for k, v in tensors.items() if k.startswith(CLIP_PREFIX)}
    heads = {k: v for k, v in tensors.items() if not k.startswith(CLIP_PREFIX)}
    for part, stored, own in (("heads", heads, _heads_state(detector)),
                              ("CLIP", clip, detector.backbone.model.state_dict())):  # fmt: skip
        extra = sorted(set(stored) - set(own))
        missing = sorted(set(own) - set(stored)) if part == "heads" else []
        bad = [k for k in set(stored) & set(own) if stored[k].shape != own[k].shape]
        if extra or missing or bad:
            raise ConfigError(f"{path} does not fit the detector's {part}: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}, other shapes {bad[:5]}")  # fmt: skip
        target = detector if part == "heads" else detector.backbone.model
        target.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in stored.items()}, strict=False)
    return meta
