"""What an index is built from: a model (run dir, config or plain backbone) and items (a dataset split or a folder).

* **Model** (``--model``): a run directory (its ``config.yaml`` and latest checkpoint, as ``vlprompt eval``), an
  exported folder (``vlprompt export``) or ``hf-hub:ORG/NAME`` (such a folder on the Hub; an open_clip model there is
  a frozen backbone), a YAML config (its method untrained, e.g. zero-shot), or a backbone name with ``--pretrained``
  (a frozen CLIP).
  :func:`resolve_model` returns the method and a JSON *spec* from which :func:`load_model` rebuilds the very
  same encoder at search time; the spec's fingerprint (checkpoint hash) catches a run that changed since.
* **Data** (``--data``): a run directory or YAML config (its ``data`` section; ``--split`` picks the annotation
  file), an annotation file (``--format``, default karpathy, and ``--root``; without it a Karpathy file's images
  resolve as in every command, :func:`vlprompt.data.sources.split_files`), or a folder of images and videos.
  Without ``--data`` the model's own config gives the data. ``key=value`` overrides apply to both configs.
* Items are :class:`Part` s: one per kind of input (``image``, ``video``, ``text``), each a dataset of raw inputs
  with content ids (the feature cache's keys) and one JSON record per row (what search results show).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlprompt.config import Config, DataConfig, load_config
from vlprompt.data.features import ImageFiles, caption_sample_id, image_sample_id
from vlprompt.data.karpathy import implied_image_root
from vlprompt.data.media import MISSING, UNREADABLE, BadSamples, is_image_file
from vlprompt.data.sources import split_files
from vlprompt.data.video import VideoTransform, is_video_file, read_frames
from vlprompt.errors import ConfigError, DataError
from vlprompt.methods import Method

KINDS = ("image", "video", "text")
MODALITIES = ("visual", "text")


# ---- the model ----------------------------------------------------------------------------------------
def _sha256(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _is_config(path: Path) -> bool:
    return path.is_file() and path.suffix in (".yaml", ".yml")


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def model_spec(target: str, pretrained: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON description of ``--model`` (run dir, exported folder, ``hf-hub:`` id, config or backbone name) with
    its fingerprint."""
    from vlprompt.core.hub import HUB_PREFIX, resolve_trained

    path = Path(target).expanduser()
    # A run directory, an exported folder (its own checkpoint) or, without --pretrained, hf-hub:ORG/NAME: a vlprompt
    # export on the Hub (its local copy in the Hugging Face cache is what the spec names) or an open_clip model.
    hub = target.startswith(HUB_PREFIX)
    trained = resolve_trained(target, backbone_ok=True) if not hub or pretrained is None else None
    if trained is not None:
        weights = trained.weights
        fingerprint = _sha256(weights) if weights is not None and weights.is_file() else "no-checkpoint"
        checkpoint = str(trained.checkpoint) if trained.checkpoint else None
        spec = {"kind": "run", "target": str(trained.folder.resolve()), "checkpoint": checkpoint}
    elif _is_config(path):
        spec = {"kind": "config", "target": str(path.resolve()), "checkpoint": None}
        fingerprint = _sha256(path)
    elif path.exists():
        raise ConfigError(f"--model {target}: expected a run directory (with config.yaml), a YAML config or a name")
    else:
        if pretrained is None and not hub:  # an open_clip model on the Hub brings its weights (pretrained unused)
            if not target.startswith("vlprompt-"):
                raise ConfigError(f"give --pretrained for {target} (an open_clip tag such as openai, or 'none')")
            pretrained = "world"
        pretrained = None if pretrained is None or pretrained.lower() in ("none", "null", "") else pretrained
        spec = {"kind": "backbone", "target": target, "pretrained": pretrained, "checkpoint": None}
        fingerprint = f"{target}@{pretrained}"
    spec["overrides"] = list(overrides) if spec["kind"] != "backbone" else []
    spec["fingerprint"] = fingerprint if spec["kind"] == "backbone" else f"{fingerprint}{_overrides_tag(overrides)}"
    return spec


def _overrides_tag(overrides: Sequence[str]) -> str:
    # model-relevant overrides change the encoder; data.* ones do not
    relevant = sorted(o for o in overrides if not o.startswith(("data.", "train.", "log.", "device=", "out_dir=")))
    return "" if not relevant else "+" + hashlib.sha256("\n".join(relevant).encode()).hexdigest()[:8]


def spec_config(spec: dict[str, Any]) -> Config | None:
    """The config behind a run/config model spec (None for a plain backbone)."""
    if spec["kind"] == "backbone":
        return None
    target = Path(spec["target"])
    return load_config(target / "config.yaml" if spec["kind"] == "run" else target, spec.get("overrides") or None)


def load_model(spec: dict[str, Any], device: str | torch.device = "auto") -> Method:
    """The encoder a spec describes, in eval mode; refuses a run whose checkpoint changed since the spec was made."""
    from vlprompt.backbone import load_backbone
    from vlprompt.core.checkpoint import load_trainable
    from vlprompt.core.factory import build_model, resolve_device, seed_everything
    from vlprompt.methods import build_method

    device = resolve_device(device) if isinstance(device, str) else device
    if spec["kind"] == "backbone":
        seed_everything(0)  # random-init backbones (pretrained none) must be the same at build and search time
        backbone = load_backbone(spec["target"], spec["pretrained"], device=device)
        return build_method({"name": "zeroshot"}, backbone).to(device).eval()
    target = Path(spec["target"])
    if not target.exists():
        raise ConfigError(f"the model of this index, {target}, no longer exists (moved?); rebuild the index")
    now = model_spec(str(target), None, spec.get("overrides") or ())
    if now["fingerprint"] != spec["fingerprint"]:
        raise ConfigError(f"{target} changed since the index was built (new checkpoint?); rebuild the index")
    cfg = spec_config(spec)
    seed_everything(cfg.seed)  # methods with random prompt init must match the build
    method = build_model(cfg, device)
    if spec["kind"] == "run":
        if spec["checkpoint"] is None and method.trainable_parameters():
            raise ConfigError(f"{target} has no checkpoint to encode with")
        if spec["checkpoint"] is not None:
            load_trainable(Path(spec["checkpoint"]) / "trainable.safetensors", method)
    return method.eval()


def resolve_model(
    target: str, pretrained: str | None = None, overrides: Sequence[str] = (), device: str = "auto"
) -> tuple[Method, dict[str, Any]]:
    """The method ``--model`` names and its spec (what the index manifest stores)."""
    spec = model_spec(target, pretrained, overrides)
    return load_model(spec, device), spec


# ---- the data -----------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """Where the items come from: a config ``data`` section and split, or a folder."""

    data: DataConfig | None = None
    split: str = "test"
    folder: Path | None = None
    described: dict[str, Any] = field(default_factory=dict)


def resolve_data(
    data: str | None,
    model: dict[str, Any],
    split: str = "test",
    fmt: str | None = None,
    root: str | None = None,
    overrides: Sequence[str] = (),
) -> DataSource:
    """Interpret ``--data`` (see the module docstring)."""
    data_overrides = [o for o in overrides if o.startswith("data.")]
    if data is None:
        cfg = spec_config(model)
        if cfg is None:
            raise ConfigError("give --data (a config, run directory, annotation file or folder) for a plain backbone")
        return _from_config(cfg, split, {"source": model["target"]})
    path = Path(data).expanduser()
    if _is_run_dir(path) or _is_config(path):
        cfg = load_config(path / "config.yaml" if path.is_dir() else path, list(overrides) or None)
        return _from_config(cfg, split, {"source": str(path.resolve())})
    if path.is_dir():
        return DataSource(folder=path.resolve(), described={"source": str(path.resolve()), "format": "folder"})
    if not path.is_file():
        raise DataError(f"--data {data} does not exist")
    fmt = fmt or "karpathy"
    if root:
        base = Path(root).expanduser()
    else:  # a Karpathy file's images resolve as in every command (README "Real data layout")
        base = implied_image_root(path.resolve()) if fmt == "karpathy" else path.resolve().parent
    settings = [f"data.format={fmt}", f"data.root={base.resolve()}", f"data.{split}={path.resolve()}"]
    cfg = load_config(None, settings + data_overrides)
    return _from_config(cfg, split, {"source": str(path.resolve())})


def _from_config(cfg: Config, split: str, described: dict[str, Any]) -> DataSource:
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test, got {split!r}")
    if not getattr(cfg.data, split):
        raise ConfigError(f"data.{split} is empty in {described['source']}: nothing to index")
    d = cfg.data
    described = {**described, "format": d.format, "root": d.root, "split": split, "annotation": getattr(d, split)}
    if d.format == "karpathy":
        described["images"] = str(split_files(d, split).images.resolve())
    return DataSource(data=d, split=split, described=described)


# ---- parts: what gets encoded -------------------------------------------------------------------------
@dataclass
class Part:
    """One kind of input: ``dataset[r]`` is the input of ``ids[r]`` (None if unreadable), ``items[r]`` its record."""

    kind: str
    ids: list[str]
    dataset: Any
    items: list[dict[str, Any]]


class VideoFiles(Dataset):
    """Videos by path: item = (frames [T, 3, S, S], mask [T]) at the segment centres, or None if undecodable."""

    def __init__(self, paths: Sequence[Path], num_frames: int, transform: Callable[[torch.Tensor], Any]) -> None:
        self.paths, self.num_frames, self.transform = list(paths), num_frames, transform
        self.bad_samples = BadSamples()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            frames, mask = read_frames(self.paths[i], self.num_frames, "uniform")
        except DataError as err:
            self.bad_samples.add(self.paths[i], MISSING if not self.paths[i].exists() else UNREADABLE, str(err))
            return None
        return self.transform(frames), mask


def collect_parts(source: DataSource, modality: str, method: Method, num_frames: int | None = None) -> list[Part]:
    """The parts to encode: the split's images or videos (``visual``) or its captions (``text``)."""
    if modality not in MODALITIES:
        raise ConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
    b = method.backbone
    video_transform = VideoTransform(b.image_size, b.image_mean, b.image_std)
    if source.folder is not None:
        if modality == "text":
            raise ConfigError("a folder has no captions to index; use --modality visual (or an annotation file)")
        return _folder_parts(source.folder, b.preprocess_val, video_transform, num_frames or 12)
    from vlprompt.core.factory import visual_spec
    from vlprompt.data.sources import eval_set

    data = source.data
    gallery = eval_set(data, source.split, visual_spec(b))
    if gallery is None or gallery.num_visual == 0:
        raise DataError(f"data.{source.split} holds no readable items")
    video = gallery.names[0] == "t2v"
    if video:
        split = gallery.dataset.split
        paths, visual_ids = list(split.video_paths), list(split.video_ids)
    else:
        paths = list(gallery.dataset.gallery.image_paths)
        visual_ids = [image_sample_id(p, data.root) for p in paths]
    captions_of: list[list[str]] = [[] for _ in paths]
    for caption, v in zip(gallery.captions, gallery.txt2vis):
        captions_of[v].append(caption)
    kind = "video" if video else "image"
    if modality == "visual":
        items = [
            {"id": i, "kind": kind, "path": str(p), "captions": c} for i, p, c in zip(visual_ids, paths, captions_of)
        ]
        if video:
            dataset = VideoFiles(paths, num_frames or data.num_frames, video_transform)
        else:
            dataset = ImageFiles(paths, b.preprocess_val)
        return [Part(kind, visual_ids, dataset, items)]
    ids, texts, items, seen = [], [], [], set()
    for caption, v in zip(gallery.captions, gallery.txt2vis):
        cid = caption_sample_id(visual_ids[v], caption)
        if cid in seen:  # the same caption twice for one item: one row
            continue
        seen.add(cid)
        ids.append(cid)
        texts.append(caption)
        items.append({"id": cid, "kind": "text", "text": caption, "path": str(paths[v]), "visual": kind})
    return [Part("text", ids, texts, items)]


def _folder_parts(folder: Path, image_transform: Any, video_transform: Any, num_frames: int) -> list[Part]:
    images: list[Path] = []
    videos: list[Path] = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden folders (caches, .git) skipped
        for name in sorted(files):
            if name.startswith("."):
                continue
            if is_image_file(name):
                images.append(Path(dirpath, name))
            elif is_video_file(name):
                videos.append(Path(dirpath, name))
    if not images and not videos:
        raise DataError(f"{folder} holds no image or video files")
    parts = []
    if images:
        ids = [image_sample_id(p, folder) for p in images]
        items = [{"id": i, "kind": "image", "path": str(p), "captions": []} for i, p in zip(ids, images)]
        parts.append(Part("image", ids, ImageFiles(images, image_transform), items))
    if videos:
        ids = [image_sample_id(p, folder) for p in videos]
        items = [{"id": i, "kind": "video", "path": str(p), "captions": []} for i, p in zip(ids, videos)]
        parts.append(Part("video", ids, VideoFiles(videos, num_frames, video_transform), items))
    return parts
