"""Captioning runs: training a ClipCap / CapDec mapper, and captioning images with or without RLCF's test-time tuning.

- :func:`train_captioner`: the core trainer (checkpoints, resume, run directory) with a captioning evaluation
  (:func:`caption_evaluator`: the validation / test images decoded with ``final_beams`` (5) beams, coco-caption
  metrics and CLIPScore / RefCLIPScore) in place of retrieval's. ``vlprompt train`` sends clipcap / capdec here.
- :func:`caption_images`: caption a folder, a Karpathy file or a COCO-caption / nocaps file
  (:mod:`vlprompt.data.captions`) with a trained run, an export or a config. Without adaptation images are decoded in
  batches; ``rlcf_caption`` with ``tta.steps > 0`` adapts per image, episodically (``runners.tta``: ``adapt``, then
  ``EpisodicState.finish_sample`` restores the mapper and zeroes AdamW's state in place, never a copy), with the
  reward image features of a whole batch computed in one call. Writes ``captions.json`` and, where references exist,
  metrics per domain (nocaps: in / near / out, plus ``all``) and seconds per image to ``metrics.json``.

CLIPScore's evaluation CLIP is ``method.clipscore_model`` (RLCF's Table 3: ViT-B-32 ``openai``; default: the policy
CLIP). It reads the policy's input tensors, renormalised and resized to its own size (as the reward CLIPs do).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlprompt.config import Config, load_config, to_yaml
from vlprompt.core.factory import build_model, resolve_device, seed_everything, visual_spec
from vlprompt.core.hub import TrainedModel, load_weights, resolve_trained
from vlprompt.core.rundir import run_dir_for, write_json
from vlprompt.core.trainer import train
from vlprompt.data.captions import ALL_DOMAINS, CaptionImages, CaptionSet, annotation_caption_set, folder_caption_set
from vlprompt.data.sources import EvalSet, data_path
from vlprompt.errors import ConfigError
from vlprompt.eval.captioning import CLIPSCORE_PREFIX, COCO_METRICS, caption_metrics, clip_score, ref_clip_score
from vlprompt.methods import Method
from vlprompt.methods.captioning import CaptionerMethod, CaptionerOptions
from vlprompt.methods.rlcf import RewardCLIP, RewardEncoder
from vlprompt.runners.tta import adapt, build_tta_method, episodic_state, fast_cpu_math, load_reward, make_optimizer

log = logging.getLogger(__name__)

TRAINED_METHODS = ("clipcap", "capdec")
TTA_METHOD = "rlcf_caption"
#: ``--tta rlcf`` on a trained ClipCap / CapDec without further settings: the reference's COCO->Flickr scripts
#: (RLCF spec 2c: T, lr, K), AdamW eps 1e-6 and no weight decay. ``configs/rlcf_caption_*.yaml`` hold all four.
RLCF_DEFAULTS = {
    "clipcap": ["tta.steps=4", "tta.lr=2.0e-6", "method.sample_k=10"],
    "capdec": ["tta.steps=4", "tta.lr=5.0e-6", "method.sample_k=6"],
}
RLCF_OPTIMIZER = ["tta.eps=1.0e-6", "tta.weight_decay=0.0"]
#: The paper's reward CLIP, for a captioner on a real CLIP (the embedded world's keep the method's default reward).
RLCF_REWARD = ["method.reward=[ViT-L-14]", "method.reward_pretrained=[openai]"]


def is_captioning(cfg: Config) -> bool:
    """Whether the config's method is a captioner (trained here, or adapted at test time)."""
    return cfg.method.get("name") in (*TRAINED_METHODS, TTA_METHOD)


# ---- evaluation --------------------------------------------------------------------------------------------------
class ClipScorer:
    """The evaluation CLIP of CLIPScore / RefCLIPScore; texts get Hessel et al.'s prefix ``"A photo depicts "``."""

    def __init__(self, method: CaptionerMethod, device: torch.device, precision: str = "fp32") -> None:
        o, b = method.options, method.backbone
        name, tag = o.clipscore_model, o.clipscore_pretrained
        tag = None if tag in ("", "none", "null") else tag  # as the reward models' tags: none = random init
        encoder = load_reward(name, tag, device, precision) if name else RewardEncoder.from_backbone(b)
        self.clip = RewardCLIP([encoder])
        self.mean, self.std = b.image_mean, b.image_std
        self.name = f"{name}:{o.clipscore_pretrained or '-'}" if name else "the policy CLIP"

    def image_features(self, images: Tensor) -> Tensor:
        """Features of policy-normalised images ``[B, D]`` (fp32, normalised, on the CPU)."""
        return self.clip.image_features(images, self.mean, self.std)[0].cpu()

    def text_features(self, texts: Sequence[str]) -> Tensor:
        return self.clip.text_features([CLIPSCORE_PREFIX + t for t in texts])[0].cpu()


def scores_of(
    captions: Sequence[str],
    references: Sequence[Sequence[str]] | None,
    image_feats: Tensor,
    scorer: ClipScorer,
    metrics: Sequence[str] | None = None,
) -> dict[str, Any]:
    """CLIPScore of one set and, with references, RefCLIPScore and coco-caption's metrics (``None`` + the reason
    in ``unavailable`` where one cannot run here)."""
    out: dict[str, Any] = {"images": len(captions)}
    caption_feats = scorer.text_features(captions)
    out["CLIPScore"] = clip_score(image_feats, caption_feats)
    if references is None:
        return out
    flat = [r for refs in references for r in refs]
    ref_feats = scorer.text_features(flat).split([len(r) for r in references])
    out["RefCLIPScore"] = ref_clip_score(image_feats, caption_feats, list(ref_feats))
    coco = caption_metrics(dict(enumerate(captions)), dict(enumerate(references)), metrics)
    out.update(coco.scores)
    out.update(unavailable=dict(coco.unavailable), tokenizer=coco.tokenizer)
    return out


def _batches(data: Dataset, batch_size: int, workers: int) -> DataLoader:
    def collate(items: list) -> list:
        return [x for x in items if x is not None]  # undecodable images are recorded by the dataset and skipped

    return DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate)


def caption_evaluator(method: Method, gallery: EvalSet, cfg: Config, metrics: Sequence[str] | None = None) -> dict:
    """The trainer's evaluation for captioners: every gallery image decoded with ``final_beams`` beams, then
    :func:`scores_of` against its captions (the references)."""
    if not isinstance(method, CaptionerMethod):
        raise ConfigError(f"captioning evaluation needs a captioner, got {type(method).__name__}")
    refs: list[list[str]] = [[] for _ in range(gallery.num_visual)]
    for caption, image in zip(gallery.captions, gallery.txt2vis):
        refs[image].append(caption)
    device = method.backbone.logit_scale.device
    scorer = ClipScorer(method, device, cfg.backbone.precision)
    was_training = method.training
    method.eval()
    captions, feats, kept = [], [], []
    for items in _batches(gallery.dataset, cfg.train.eval_batch_size, cfg.data.num_workers):
        if not items:
            continue
        images = torch.stack([x[0] for x in items]).to(device)
        captions += method.caption(images)
        feats.append(scorer.image_features(images))
        kept += [x[1] for x in items]
    method.train(was_training)
    if not kept:
        raise ConfigError("no evaluation image could be read")
    return scores_of(captions, [refs[i] for i in kept], torch.cat(feats), scorer, metrics)


def train_captioner(cfg: Config, progress: bool = True, interrupt_at_step: int | None = None) -> dict[str, Any]:
    """Train a ClipCap / CapDec mapper (``vlprompt train``) with the captioning evaluation."""
    if cfg.method.get("name") not in TRAINED_METHODS:
        raise ConfigError(f"train_captioner trains {' or '.join(TRAINED_METHODS)}, not {cfg.method.get('name')!r}")
    return train(cfg, progress, interrupt_at_step, evaluate=caption_evaluator)


# ---- captioning images -------------------------------------------------------------------------------------------
def _derived_rlcf_config(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` (a trained ClipCap / CapDec) turned into an ``rlcf_caption`` run with the same captioner."""
    section = dict(cfg.method)
    base = "capdec" if section.get("name") == "capdec" or section.get("embedding") == "text" else "clipcap"
    keep = {f.name for f in dataclasses.fields(CaptionerOptions)}
    section = {"name": TTA_METHOD, **{k: v for k, v in section.items() if k in keep}}
    section["reference_checkpoint"] = ""  # the run's own trained mapper is loaded instead
    values = yaml.safe_load(to_yaml(dataclasses.replace(cfg, method=section)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{cfg.run_name or 'captioner'}.yaml"
        path.write_text(yaml.safe_dump(values))
        reward = RLCF_REWARD if cfg.backbone.pretrained != "world" else []
        return load_config(path, [*RLCF_DEFAULTS[base], *RLCF_OPTIMIZER, *reward, *overrides])


def resolve_captioner(
    target: str | Path, overrides: Sequence[str] = (), tta: str | None = None, weights: str | Path | None = None
) -> tuple[Config, TrainedModel | None]:
    """The config to caption with and the trained tensors to load: ``target`` is a run directory, an export or
    ``hf-hub:`` (its mapper is loaded), or a config (``weights``: a run / export whose mapper to load).
    ``tta``: ``None`` = as the config says, ``"none"`` = no adaptation, ``"rlcf"`` = RLCF (a trained ClipCap /
    CapDec becomes ``rlcf_caption`` with :data:`RLCF_DEFAULTS` unless overridden)."""
    if tta not in (None, "none", "rlcf"):
        raise ConfigError(f"--tta must be none or rlcf, got {tta!r}")
    trained = resolve_trained(target)
    if trained is not None and weights is not None:
        raise ConfigError("--weights goes with a config; a run directory or an export brings its own")
    config = trained.config if trained is not None else Path(target)
    if trained is None and config.is_dir():
        raise ConfigError(f"{config} is neither a run directory (config.yaml) nor an exported folder")
    extra = ["tta.steps=0"] if tta == "none" else []  # last, so it wins over the overrides
    if tta == "rlcf" and load_config(config).method.get("name") in TRAINED_METHODS:
        # the overrides may name rlcf_caption's options (method.sample_k), which ClipCap's section refuses
        cfg = _derived_rlcf_config(load_config(config), overrides)
    else:
        cfg = load_config(config, [*overrides, *extra])
    name = cfg.method.get("name")
    if not is_captioning(cfg):
        raise ConfigError(f"method {name!r} is not a captioner; use clipcap, capdec or rlcf_caption")
    if tta == "rlcf" and not cfg.tta.steps:
        raise ConfigError("--tta rlcf with tta.steps=0 adapts nothing; give tta.steps > 0")
    if weights is not None:
        trained = resolve_trained(weights)
        if trained is None:
            raise ConfigError(f"--weights {weights}: expected a run directory, an export or hf-hub:ORG/NAME")
    return cfg, trained


def images_to_caption(cfg: Config, images: str | Path | None, annotations: str | Path | None,
                      image_root: str | Path | None = None) -> CaptionSet:  # fmt: skip
    """What to caption: ``images`` (a folder), ``annotations`` (a file), else the config's ``data.test``."""
    if images is not None and annotations is not None:
        raise ConfigError("give either an image folder or an annotation file, not both")
    if images is not None:
        return folder_caption_set(images)
    if annotations is not None:
        return annotation_caption_set(annotations, image_root, cfg.data.strict)
    if not cfg.data.test:
        raise ConfigError("nothing to caption: give --images FOLDER, --data ANNOTATION.json or data.test=FILE")
    root = image_root or (cfg.data.root or None)
    return annotation_caption_set(data_path(cfg.data, cfg.data.test), root, cfg.data.strict)


def _domain_metrics(
    images: CaptionSet, kept: list[int], captions: list[str], feats: Tensor, scorer: ClipScorer,
    metrics: Sequence[str] | None,
) -> dict[str, Any]:  # fmt: skip
    """``{domain: scores}`` for every domain present, and ``all`` over every image when there are several."""
    domains = [images.domains[i] for i in kept]
    groups = {d: [n for n, x in enumerate(domains) if x == d] for d in dict.fromkeys(domains)}
    if len(groups) > 1:
        groups[ALL_DOMAINS] = list(range(len(kept)))
    refs = images.references
    return {
        d: scores_of(
            [captions[n] for n in idx],
            None if refs is None else [refs[kept[n]] for n in idx],
            feats[idx],
            scorer,
            metrics,
        )  # fmt: skip
        for d, idx in groups.items()
    }


@torch.no_grad()
def _encode_reward(method: Any, images: Tensor) -> list[Tensor] | None:
    reward = getattr(method, "reward", None)
    if reward is None:
        return None
    return reward.image_features(images, method.backbone.image_mean, method.backbone.image_std)


def caption_images(
    target: str | Path,
    overrides: Sequence[str] = (),
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    image_root: str | Path | None = None,
    tta: str | None = None,
    weights: str | Path | None = None,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Caption images with a captioner (see the module docstring); returns the summary written to
    ``OUT/metrics.json`` (``OUT`` defaults to ``RUN_DIR/captions`` or the config's run directory + ``/captions``)."""
    if metrics is not None and (unknown := [m for m in metrics if m not in COCO_METRICS]):
        raise ConfigError(f"unknown caption metrics {unknown}; choose from {list(COCO_METRICS)}")
    cfg, trained = resolve_captioner(target, overrides, tta, weights)
    todo = images_to_caption(cfg, images, annotations, image_root)  # data problems show before weights load
    out_dir = Path(out) if out else (trained.folder if trained is not None and weights is None
                                     else run_dir_for(cfg)) / "captions"  # fmt: skip
    device = resolve_device(cfg.device)
    fast_cpu_math()
    seed_everything(cfg.seed)
    adapting = cfg.method.get("name") == TTA_METHOD and cfg.tta.steps > 0
    method = build_tta_method(cfg, device) if adapting else build_model(cfg, device)
    if trained is not None:
        load_weights(trained, method)
    method.eval()
    optimizer = make_optimizer(method.trainable_parameters(), cfg.tta) if adapting else None
    state = episodic_state(method, optimizer, cfg.tta) if adapting else None
    scorer = ClipScorer(method, device, cfg.backbone.precision)
    spec = visual_spec(method.backbone)
    data = CaptionImages(todo, spec.image_eval, cfg.data.strict)
    captions: list[str] = []
    kept: list[int] = []
    feats: list[Tensor] = []
    loop = 0.0
    for items in _batches(data, cfg.train.eval_batch_size, cfg.data.num_workers):
        if not items:
            continue
        batch = torch.stack([x[0] for x in items]).to(device)
        start = time.perf_counter()
        if adapting:
            reward_images = _encode_reward(method, batch)  # the whole batch's reward features in one call
            for i in range(batch.shape[0]):
                episode = method.begin(batch[i : i + 1], [f[i : i + 1] for f in reward_images])
                adapt(method, episode, cfg.tta.steps, optimizer)
                captions.append(method.predict(episode))
                state.finish_sample()  # the mapper and AdamW's state back to the start, in place
        else:
            captions += method.caption(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        loop += time.perf_counter() - start
        feats.append(scorer.image_features(batch))
        kept += [x[1] for x in items]
    if todo.bad_samples:
        log.warning("skipped images that could not be read: %s", todo.bad_samples.summary())
    if not kept:
        raise ConfigError(f"no image of {todo.source} could be read ({todo.bad_samples.summary()})")
    records = [{"id": todo.ids[i], "image": str(todo.image_paths[i]), "domain": todo.domains[i], "caption": c}
               for i, c in zip(kept, captions)]  # fmt: skip
    summary: dict[str, Any] = {
        "source": todo.source,
        "method": cfg.method.get("name"),
        "adapted": adapting,
        "tta": {"steps": cfg.tta.steps, "lr": cfg.tta.lr, "K": cfg.method.get("sample_k")} if adapting else None,
        "images": len(kept),
        "seconds_per_image": loop / len(kept),
        "clipscore_model": scorer.name,
        "metrics": _domain_metrics(todo, kept, captions, torch.cat(feats), scorer, metrics),
    }
    if todo.bad_samples:
        summary["bad_samples"] = todo.bad_samples.as_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "captions.json", records)
    write_json(out_dir / "metrics.json", summary)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    summary["out"] = str(out_dir)
    return summary
