"""Contrastive pre-training / full fine-tuning of a whole CLIP (the recipes behind ``vlprompt pretrain``).

:func:`pretrain` is open_clip's training on any dataset config: method ``finetune`` (every CLIP weight, the
temperature included) with open_clip's symmetric contrastive loss (``ClipLoss``), through the same trainer as
every method; ``backbone.pretrained: null`` starts from random initialisation, a tag / file / run directory from
those weights. The resulting run directory is itself a backbone (``backbone.pretrained=RUN_DIR``), and
:func:`export_full_model` writes its weights as an open_clip checkpoint. :func:`pretrain_embedded` is the recipe of
the shipped tiny CLIPs: the same training on a built world's base part, then exported in the compact embedded
format with a model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlprompt.backbone import load_backbone
from vlprompt.backbone.embedded import save_embedded_weights
from vlprompt.backbone.loading import run_backbone, save_open_clip_checkpoint
from vlprompt.config import BackboneConfig, Config, DataConfig, TrainConfig
from vlprompt.core.evaluate import evaluate_retrieval
from vlprompt.core.factory import visual_spec
from vlprompt.core.rundir import run_dir_for
from vlprompt.core.trainer import train
from vlprompt.data.sources import eval_set
from vlprompt.data.world import layout
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method

#: The method that trains every CLIP weight with the contrastive loss.
FULL_MODEL_METHOD = "finetune"

#: Words prompt methods use beyond the world's captions (CoOp's init, placeholders).
EXTRA_TEXTS = ("a photo of a", "X X X X X X X X X X X X X X X X", "a picture of a")


def world_texts(root: Path) -> list[str]:
    """Every caption, class name and template text of a built world (for the sparse embedding)."""
    texts: list[str] = list(EXTRA_TEXTS)
    for folder in ("retrieval", "continual"):
        for path in sorted((root / folder).glob("*.json")):
            for record in json.loads(path.read_text()):
                if isinstance(record, dict) and "caption" in record:
                    cap = record["caption"]
                    texts.extend(cap if isinstance(cap, list) else [cap])
    video = layout.video_data_json(root)
    if video.exists():
        texts.extend(s["caption"] for s in json.loads(video.read_text())["sentences"])
    classes = layout.classes_file(root)
    if classes.exists():
        meta = json.loads(classes.read_text())
        names = [*meta.get("names", []), *meta.get("coarse_names", [])]
        texts.extend(t.format(n) for t in meta.get("templates", ["{}"]) for n in names)
    return texts


def pretrain(cfg: Config, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Train ``cfg`` (whose method must be ``finetune``) and return its final metrics and run directory."""
    name = cfg.method.get("name")
    if name != FULL_MODEL_METHOD:
        raise ConfigError(
            f"pretrain trains the whole CLIP, so the config's method must be {FULL_MODEL_METHOD!r}, not {name!r} "
            f"(set method: {{name: {FULL_MODEL_METHOD}}}, or override method.name={FULL_MODEL_METHOD}); prompt "
            "methods train with `vlprompt train`"
        )
    result = train(cfg, progress=progress)
    return result, run_dir_for(cfg)


def export_full_model(run_dir: Path, out: Path) -> Path:
    """Write the whole CLIP of a full fine-tuning run as an open_clip checkpoint (safetensors) at ``out``."""
    name, _ = run_backbone(run_dir)
    return save_open_clip_checkpoint(load_backbone(name, str(run_dir)).model, out)


def pretrain_config(
    model: str, world: Path, steps: int, batch_size: int, lr: float, seed: int, out_dir: Path
) -> Config:
    """The training config of the embedded pretraining recipe."""
    return Config(
        backbone=BackboneConfig(name=model, pretrained=None),
        method={"name": "finetune"},
        data=DataConfig(
            root=str(world),
            train=str(layout.base_retrieval_file(world, "train").relative_to(world)),
            val=str(layout.base_retrieval_file(world, "val").relative_to(world)),
        ),
        train=TrainConfig(
            epochs=10_000,
            max_steps=steps,
            batch_size=batch_size,
            eval_batch_size=512,
            lr=lr,
            weight_decay=0.1,
            warmup_steps=max(1, steps // 20),
            eval_every=10_000,  # >= epochs: validate once, at the end (the model card reports it)
            checkpoint_every=100,
        ),
        seed=seed,
        device="cpu",
        out_dir=str(out_dir),
        run_name=f"pretrain-{model}",
        resume=True,
    )


def zero_shot_report(model: str, weights: Path, world: Path) -> dict[str, Any]:
    """Retrieval metrics of the exported model on the base val split and every test domain."""
    world = Path(world).resolve()
    backbone = load_backbone(model, str(weights))
    method = build_method({"name": "zeroshot"}, backbone)
    galleries = {"base_val": layout.base_retrieval_file(world, "val")}
    galleries.update({f"test_{d}": layout.retrieval_file(world, "test", d) for d in layout.DOMAINS})
    spec = visual_spec(backbone)
    report = {}
    for name, ann in galleries.items():
        gallery = eval_set(DataConfig(root=str(world), test=str(ann)), "test", spec)
        metrics = evaluate_retrieval(method, gallery, 512)
        report[name] = {k: round(v, 2) for k, v in metrics.items() if "R@" in k or k == "rsum"}
    return report


def pretrain_embedded(
    model: str,
    world: Path,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    runs_dir: Path = Path("runs"),
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain ``model`` on ``world``'s base part and write ``out/<model>.safetensors`` plus a model card."""
    cfg = pretrain_config(model, world, steps, batch_size, lr, seed, runs_dir)
    result, run_dir = pretrain(cfg, progress=progress)
    trained = load_backbone(model, str(run_dir))  # the run directory as a backbone: its trained CLIP
    clip, tokenizer = trained.model, trained.tokenizer
    keep = torch.unique(tokenizer(world_texts(world))).tolist()
    manifest = json.loads(layout.manifest_file(world).read_text())
    meta = {
        "model": model,
        "steps": str(steps),
        "batch_size": str(batch_size),
        "lr": str(lr),
        "seed": str(seed),
        "world_seed": str(manifest.get("seed")),
        "world_size": str(manifest.get("size")),
        "world_version": str(manifest.get("version")),
    }
    weights = out / f"{model}.safetensors"
    save_embedded_weights(clip, weights, keep, meta)
    report = zero_shot_report(model, weights, world)
    card = {
        **meta,
        "kept_token_rows": len(keep),
        "logit_scale": round(float(clip.logit_scale.detach().exp()), 3),
        "final_val_during_training": result.get("val"),
        "zero_shot": report,
        "command": f"vlprompt pretrain --model {model} --world WORLD --steps {steps} --batch-size {batch_size} "
        f"--lr {lr} --seed {seed} --out {out}",
    }
    (out / f"{model}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card
