"""Compact storage of the embedded world's pretrained detector heads (``vlprompt-world-detector``).

The world detector is OWL-ViT's heads (:class:`~vlprompt.backbone.detector.Detector`: ``layer_norm``,
``class_head``, ``box_head``) and the shipped ``vlprompt-tiny`` CLIP (world weights) fine-tuned with them by
:mod:`vlprompt.runners.world_detector` on the world's grounding base part, as OWL-ViT trains its whole model. One
fp16 safetensors file (loaded into the model's dtype) beside the tiny CLIPs in ``assets/models`` (or the vlprompt
cache, :func:`~vlprompt.backbone.loading.embedded_weights_path`) holds the heads under their own names and the
CLIP's tensors, except the ones training left as shipped (the sparse token table), which the backbone it started
from supplies; that backbone is in the metadata, so the file never lands on other towers. The CLIP's tensors are
stored either in full (``clip.<name>``) or, to keep everything shipped under 25 MB, as their difference from that
backbone's shipped weights (which the loader reads back, checked by their sha256): each weight matrix's difference
as a rank-``r`` truncated SVD (``delta_u.<name>`` ``[out, r]`` · ``delta_v.<name>`` ``[r, in]``, the singular values
split evenly between them; conv kernels flattened to ``[out, in*k*k]``), and vectors, and matrices the factors would
not shrink, as the full difference (``delta.<name>``). The model card ``vlprompt-world-detector.json`` reports
P@1/5/10 measured on exactly this stored form.

``grounding.detector: world`` in a config selects it (:func:`load_world_detector`): its towers replace
``backbone.*``'s and its heads are the detector's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlprompt.backbone.detector import Detector
from vlprompt.backbone.embedded import ROWS_KEY, VALUES_KEY
from vlprompt.backbone.loading import embedded_weights_path, resolve_pretrained
from vlprompt.errors import ConfigError, WeightsUnavailableError

#: The shipped detector's file name (without ``.safetensors``) and model card name (``.json``).
WORLD_DETECTOR = "vlprompt-world-detector"
#: ``grounding.detector`` value that selects the shipped detector.
WORLD_DETECTOR_TAG = "world"
#: The backbone (``backbone.name``, ``backbone.pretrained``) the shipped detector was trained from.
WORLD_DETECTOR_BACKBONE = ("vlprompt-tiny", "world")
#: Where the file keeps the fine-tuned CLIP's tensors (open_clip names after it).
CLIP_PREFIX = "clip."
#: Where a delta-stored file keeps full differences and the two SVD factors of the others.
DELTA_PREFIX, U_PREFIX, V_PREFIX = "delta.", "delta_u.", "delta_v."
_KIND = "vlprompt-kind"
_HEADS = "detector-heads"
#: Metadata of a delta-stored file: the SVD rank, and the sha256 of the base weights the differences are from.
RANK_KEY, BASE_KEY = "delta-rank", "delta-base-sha256"
#: Metadata keys that say how a file is stored (not what was trained).
STORAGE_KEYS = (_KIND, RANK_KEY, BASE_KEY)


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


def save_world_detector(
    detector: Detector,
    path: Path,
    metadata: dict[str, str],
    frozen: Sequence[str] = (),
    rank: int | None = None,
) -> None:
    """Write ``detector``'s heads and its CLIP's tensors but ``frozen`` (those stay the backbone's, e.g. the sparse
    token table) as fp16 safetensors; ``metadata`` must name ``backbone`` and ``pretrained`` (the towers it
    started from, which supply the ``frozen`` tensors when it loads). ``rank``: store the CLIP's tensors as their
    difference from that backbone's shipped weights, matrices as rank-``rank`` SVD factors (None: in full)."""
    if not {"backbone", "pretrained"} <= set(metadata):
        raise ValueError("the detector's metadata must name the backbone and pretrained tag it was trained from")
    if rank is not None and rank < 1:
        raise ValueError(f"the delta rank must be a positive integer, not {rank}")
    state = _heads_state(detector)
    clip = {k: v.detach().cpu() for k, v in detector.backbone.model.state_dict().items() if k not in frozen}
    if rank is None:
        state.update({CLIP_PREFIX + k: v for k, v in clip.items()})
    else:
        base_path = _base_path(metadata)
        state.update(_low_rank_delta(clip, _base_tensors(base_path), rank))
        metadata = {**metadata, RANK_KEY: str(rank), BASE_KEY: _sha256(base_path)}
    tensors = {k: v.detach().cpu().half().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={**metadata, _KIND: _HEADS})
    tmp.replace(path)


def _heads_state(detector: Detector) -> dict[str, Tensor]:
    return {k: v for k, v in detector.state_dict().items() if not k.startswith("backbone.")}


def _base_path(meta: Mapping[str, str]) -> Path:
    """The weights file of the backbone a detector file names (what its differences are from)."""
    weights = resolve_pretrained(meta["backbone"], meta["pretrained"])
    if weights is None or not Path(weights).is_file() or not weights.endswith(".safetensors"):
        raise ConfigError(
            f"the towers of {meta['backbone']} / {meta['pretrained']} are not a local safetensors file ({weights}): "
            "a world detector can only be stored as differences from shipped weights"
        )
    return Path(weights)


def _base_tensors(path: Path) -> dict[str, Tensor]:
    """The base weights (fp32), without the sparse token table (never part of a difference)."""
    return {k: v.float() for k, v in load_file(str(path)).items() if k not in (ROWS_KEY, VALUES_KEY)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _low_rank_delta(clip: Mapping[str, Tensor], base: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """``clip - base`` per tensor: matrices (conv kernels flattened) as rank-``rank`` SVD factors when those are
    smaller than the matrix, everything else in full."""
    out = {}
    for name, value in clip.items():
        if name not in base or base[name].shape != value.shape:
            raise ConfigError(f"the base weights have no tensor {name} of shape {tuple(value.shape)} to store a "
                              "difference from (leave it frozen)")  # fmt: skip
        delta = value.double() - base[name].double()
        rows = delta.shape[0] if delta.dim() >= 2 else 0
        cols = delta.numel() // rows if rows else 0
        if not rows or rank * (rows + cols) >= rows * cols:
            out[DELTA_PREFIX + name] = delta.float()
            continue
        u, s, vh = torch.linalg.svd(delta.reshape(rows, cols), full_matrices=False)
        root = s[:rank].sqrt()  # split evenly: both factors stay in fp16's range
        out[U_PREFIX + name] = (u[:, :rank] * root).float()
        out[V_PREFIX + name] = (root[:, None] * vh[:rank]).float()
    return out


def stored_towers(path: Path, meta: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """The CLIP tensors a world detector file stores (open_clip names, fp32): in full, or rebuilt as base +
    difference (``base + U·V`` for the low-rank ones) from the backbone's shipped weights, which must be the ones
    the differences were taken from."""
    meta = heads_metadata(path) if meta is None else meta
    tensors = load_file(str(path))
    clip = {k.removeprefix(CLIP_PREFIX): v.float() for k, v in tensors.items() if k.startswith(CLIP_PREFIX)}
    if RANK_KEY not in meta:
        return clip
    base_path = _base_path(meta)
    if _sha256(base_path) != meta.get(BASE_KEY):
        raise ConfigError(
            f"{path} stores its towers as differences from {base_path}, which has changed since it was written "
            f"(sha256 differs): rebuild it with `python -m vlprompt.runners.world_detector --world WORLD`"
        )
    base = _base_tensors(base_path)
    for name in (k.removeprefix(DELTA_PREFIX) for k in tensors if k.startswith(DELTA_PREFIX)):
        clip[name] = base[name] + tensors[DELTA_PREFIX + name].float()
    for name in (k.removeprefix(U_PREFIX) for k in tensors if k.startswith(U_PREFIX)):
        low = tensors[U_PREFIX + name].float() @ tensors[V_PREFIX + name].float()
        clip[name] = base[name] + low.reshape(base[name].shape)
    return clip


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
    clip = stored_towers(path, meta)
    tower_prefixes = (CLIP_PREFIX, DELTA_PREFIX, U_PREFIX, V_PREFIX)
    heads = {k: v for k, v in load_file(str(path)).items() if not k.startswith(tower_prefixes)}
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
