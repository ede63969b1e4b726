"""The recipe of the embedded world's shipped detector (``vlprompt-world-detector``).

1. :func:`train_detector`: OWL-ViT's heads (:class:`~vlprompt.backbone.detector.Detector`) from their initialisation
   and the shipped ``vlprompt-tiny`` CLIP (world weights; all but its token table) trained together, as OWL-ViT
   fine-tunes its whole model, with the REC loss (:class:`~vlprompt.methods.grounding.GroundingMethod`: DETR's
   matched classification + L1 + GIoU) on the world's grounding **base part** (plain background, every
   super-category; never a continual or test split), through the continual grounding runner's training step
   (:class:`~vlprompt.runners.grounding.GroundingLearner`, the whole base part as one task). The recipe is
   ``configs/world/pretrain_detector.yaml``. Training the towers too paid: the heads alone on the frozen towers
   reached P@1 23.9 / 6.1 (base val / clean continual test) after 20 epochs, against 29.7 / 12.9 after 5.
2. The heads and towers written compactly (:mod:`vlprompt.backbone.world_detector`): fp16, the towers as their
   difference from the shipped ``vlprompt-tiny`` weights, each weight matrix's as a rank-:data:`DELTA_RANK` SVD
   (the smallest rank of 8/16/32/64 that kept P@1 within a point of the full towers with everything shipped under
   25 MB; ``--rank`` picks another, 0 stores the towers in full).
3. :func:`measure`: P@1/5/10 of exactly that stored form (loaded back into a fresh detector, as
   ``grounding.detector: world`` does) on the base val split, the clean continual test split and each shifted
   test split, beside new heads of the same seed on the shipped towers; :func:`spot_check`: the stored form's
   answers to the first base val expressions. Both into the model card ``vlprompt-world-detector.json``.

``python -m vlprompt.runners.world_detector --world WORLD`` runs all three steps (see ``--help``);
``--measure-only`` re-measures the stored file into its card, after re-storing ``--from FILE`` (another world
detector file, e.g. one with full towers) at ``--rank`` when given, without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlprompt.backbone.world_detector import (
    RANK_KEY,
    STORAGE_KEYS,
    WORLD_DETECTOR,
    WORLD_DETECTOR_BACKBONE,
    heads_metadata,
    load_world_detector,
    save_world_detector,
)
from vlprompt.config import Config, load_config
from vlprompt.core.factory import build_model, resolve_device, seed_everything
from vlprompt.data import collate_skip_none
from vlprompt.data.continual import TaskSpec
from vlprompt.data.grounding import RefSample
from vlprompt.data.rec import RecDataset, read_rec_split
from vlprompt.data.world import layout
from vlprompt.errors import ConfigError
from vlprompt.eval.grounding import precision_at_k
from vlprompt.methods.grounding import GroundingMethod
from vlprompt.runners.grounding import GroundingLearner, grounding_tasks

#: ``configs/world`` of the source tree (the recipe).
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "world"
RECIPE = CONFIGS / "pretrain_detector.yaml"
#: CLIP tensors the recipe leaves as shipped (the sparse world vocabulary's token table).
FROZEN_CLIP = ("token_embedding.weight",)
#: The one task the base part is trained and measured as.
WHOLE = TaskSpec(0, "all", ())
METRICS = ("rec/P@1", "rec/P@5", "rec/P@10")
#: SVD rank of the stored towers' differences from the shipped vlprompt-tiny (None: store them in full).
DELTA_RANK: int | None = 32
#: Base val expressions whose answers the model card records (the small world's 16 are the same scenes).
SPOT_CHECK = 16


def recipe_config(world: Path, overrides: Sequence[str] = ()) -> Config:
    """The recipe config on ``world`` (``overrides`` as on the command line)."""
    return load_config(RECIPE, [f"data.root={world}", *overrides])


def read_as_one_task(cfg: Config, file: str | Path) -> list[RefSample]:
    """The expressions of a grounding file (relative to ``data.root``), every one as task 0."""
    data = dataclasses.replace(cfg.data, test=str(file))
    samples = read_rec_split(data, cfg.grounding, "test", grounding_tasks(cfg)[1])
    return [dataclasses.replace(s, task=0) for s in samples]


def build_detector_method(cfg: Config, heads: str | Path | None = None, train: bool = False) -> GroundingMethod:
    """The recipe's grounding method on its backbone: new heads (seeded by ``cfg.seed``), or a stored world detector
    ``heads`` (``world`` or a file: its heads and towers); ``train`` makes the heads trainable."""
    if cfg.backbone.name != WORLD_DETECTOR_BACKBONE[0]:
        raise ConfigError(f"the world detector is trained on {WORLD_DETECTOR_BACKBONE[0]}, not {cfg.backbone.name}")
    seed_everything(cfg.seed)  # new heads start the same for the same seed
    method = build_model(cfg, resolve_device(cfg.device))
    if not isinstance(method, GroundingMethod):
        raise ConfigError(f"method {cfg.method.get('name')!r} is not a grounding method")
    if heads is not None:
        load_world_detector(method.detector, heads, (cfg.backbone.name, cfg.backbone.pretrained))
    for head in method.detector.heads():
        head.requires_grad_(train)
    return method


def evaluate(cfg: Config, method: GroundingMethod, samples: Sequence[RefSample]) -> dict[str, float]:
    """P@1/5/10 of ``method`` on ``samples`` (one task), as the continual grounding runner scores them."""
    learner = GroundingLearner(cfg, method, [WHOLE], samples, samples)  # (training samples unused here)
    overall = learner.evaluate(0).overall
    return {k: round(overall[k], 2) for k in METRICS}


def train_detector(cfg: Config, progress: bool = False) -> tuple[GroundingMethod, dict[str, Any]]:
    """Train new heads and the tiny CLIP's towers (all but the token table, which the world's vocabulary fixes) on
    ``data.train`` (the base part) with the recipe's ``train`` section, through the continual grounding runner's
    training step (the whole base part as one task). Returns the method and the training info."""
    method = build_detector_method(cfg, train=True)
    for name, p in method.backbone.model.named_parameters():
        p.requires_grad_(name not in FROZEN_CLIP)
    train = read_as_one_task(cfg, cfg.data.train)
    learner = GroundingLearner(cfg, method, [WHOLE], train, train[:1], progress)
    info = learner.train_task(0)
    method.backbone.freeze()  # as every method's backbone: what follows only evaluates
    return method, info


def card_files(world: Path) -> dict[str, Path]:
    """What the model card measures: base val, the clean continual test split and each shifted one."""
    files = layout.grounding_files(world)
    return {"base_val": files["base_val"], "test_clean": files["test"],
            **{f"test_{d}": files[f"test_{d}"] for d in layout.SHIFTED_DOMAINS}}  # fmt: skip


def measure(cfg: Config, heads: str | Path | None, world: Path) -> dict[str, dict[str, float]]:
    """P@1/5/10 per :func:`card_files` entry of the stored detector ``heads`` (None: new heads of ``cfg.seed`` on
    the shipped towers)."""
    method = build_detector_method(cfg, heads)
    out = {}
    for name, path in card_files(world).items():
        samples = read_as_one_task(cfg, path)
        out[name] = evaluate(cfg, method, samples)
    return out


def spot_check(cfg: Config, heads: str | Path, world: Path, n: int = SPOT_CHECK) -> dict[str, Any]:
    """The top-1 answer (pixel ``xyxy`` box, class logit) of the stored ``heads`` for the first ``n`` base val
    expressions, and their P@1: what a small world (whose first base val scenes are the same) must reproduce."""
    method = build_detector_method(cfg, heads)
    samples = read_as_one_task(cfg, layout.grounding_file(world, "base_val"))[:n]
    spec = method.backbone
    data = RecDataset(samples, method.detector.image_size, spec.image_mean, spec.image_std, strict=True)
    images, expressions, boxes, sizes = collate_skip_none([data[i] for i in range(len(data))])[:4]
    pred = method.predict(images, list(expressions), sizes, k=1)
    return {
        "expressions": list(expressions),
        "boxes": [[round(v, 2) for v in b] for b in pred.boxes[:, 0].tolist()],
        "scores": [round(v, 4) for v in pred.scores[:, 0].tolist()],
        "P@1": precision_at_k(pred.boxes, boxes, ks=(1,))["rec/P@1"],
    }


def measured_card(cfg: Config, weights: Path, world: Path, rank: int | None) -> dict[str, Any]:
    """The model card's fields measured on the stored file ``weights`` (step 3) and how it stores the towers."""
    return {
        "towers_stored": {
            "form": "full fp16" if rank is None else "fp16 difference from the backbone, matrices as rank-r SVD",
            "rank": rank,
            "file_bytes": weights.stat().st_size,
        },
        "stored": measure(cfg, weights, world),
        "new_heads_same_seed": measure(cfg, None, world),
        "spot_check_base_val": spot_check(cfg, weights, world),
    }


def _command(flags: str, out: Path, overrides: Sequence[str]) -> str:
    tail = "".join(f" {o}" for o in overrides)
    return f"OMP_NUM_THREADS=1 python -m vlprompt.runners.world_detector --world WORLD --out {out}{flags}{tail}"


def pretrain_world_detector(
    world: Path,
    out: Path,
    overrides: Sequence[str] = (),
    progress: bool = False,
    rank: int | None = DELTA_RANK,
) -> dict[str, Any]:
    """Steps 1-3 of the module docstring (the towers stored at ``rank``); writes ``out/<WORLD_DETECTOR>.safetensors``
    and ``.json``."""
    world = Path(world).resolve()
    cfg = recipe_config(world, overrides)
    start = time.perf_counter()
    method, info = train_detector(cfg, progress)
    seconds = time.perf_counter() - start
    manifest = json.loads(layout.manifest_file(world).read_text())
    meta = {
        "backbone": cfg.backbone.name,
        "pretrained": str(cfg.backbone.pretrained),
        "epochs": str(cfg.train.epochs),
        "batch_size": str(cfg.train.batch_size),
        "lr": str(cfg.train.lr),
        "seed": str(cfg.seed),
        "world_seed": str(manifest.get("seed")),
        "world_size": str(manifest.get("size")),
        "world_version": str(manifest.get("version")),
    }
    weights = out / f"{WORLD_DETECTOR}.safetensors"
    save_world_detector(method.detector, weights, meta, FROZEN_CLIP, rank)
    card = {
        **meta,
        "trained_on": "grounding/" + layout.grounding_file(world, "base_train").name,
        "train_steps": info["steps"],
        "train_seconds": round(seconds, 1),
        "final_loss": info.get("loss"),
        "trained_parameters": {
            "heads": sum(p.numel() for h in method.detector.heads() for p in h.parameters()),
            "towers": sum(p.numel() for k, p in method.backbone.model.named_parameters() if k not in FROZEN_CLIP),
        },
        **measured_card(cfg, weights, world, rank),
        "command": _command(_rank_flag(rank), out, overrides),
    }
    (out / f"{WORLD_DETECTOR}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def _rank_flag(rank: int | None) -> str:
    return "" if rank == DELTA_RANK else f" --rank {rank or 0}"


def remeasure_world_detector(
    world: Path,
    out: Path,
    source: Path | None = None,
    rank: int | None = DELTA_RANK,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """No training: re-store ``source`` (a world detector file, e.g. one with full towers) into ``out`` at ``rank``
    when given, then re-measure ``out``'s file (step 3) into its model card, keeping the card's training record."""
    world = Path(world).resolve()
    cfg = recipe_config(world, overrides)
    weights, card_path = out / f"{WORLD_DETECTOR}.safetensors", out / f"{WORLD_DETECTOR}.json"
    if not card_path.is_file():
        raise ConfigError(
            f"no model card {card_path} to re-measure into: train the detector first (no --measure-only)"
        )
    if source is not None:  # its training record (backbone, recipe, world), not how it was stored
        meta = {k: v for k, v in heads_metadata(Path(source)).items() if k not in STORAGE_KEYS}
        method = build_detector_method(cfg, source)
        save_world_detector(method.detector, weights, meta, FROZEN_CLIP, rank)
    stored_rank = heads_metadata(weights).get(RANK_KEY)
    rank = int(stored_rank) if stored_rank else None
    card = {**json.loads(card_path.read_text()), **measured_card(cfg, weights, world, rank)}
    card["stored_with"] = _command(" --measure-only" + (" --from FILE" + _rank_flag(rank) if source else ""), out,
                                   overrides)  # fmt: skip
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vlprompt.runners.world_detector``: the whole recipe."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, required=True, help="a built world (vlprompt world build)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "models",
                   help="where the heads and the model card go (default: the shipped assets)")  # fmt: skip
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.add_argument(
        "--rank",
        type=int,
        default=DELTA_RANK,
        help=f"SVD rank of the stored towers' differences (default {DELTA_RANK}; 0: store them in full)",
    )
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="no training: re-measure the stored file in --out into its model card",
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="with --measure-only: first re-store this world detector file into --out at --rank",
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=2")
    args = p.parse_args(argv)
    rank = args.rank or None
    if args.source is not None and not args.measure_only:
        p.error("--from goes with --measure-only")
    if args.measure_only:
        card = remeasure_world_detector(args.world, args.out, args.source, rank, args.overrides)
    else:
        card = pretrain_world_detector(args.world, args.out, args.overrides, args.progress, rank)
    print(json.dumps({k: card[k] for k in ("stored", "new_heads_same_seed", "towers_stored")}, indent=1))


if __name__ == "__main__":
    main()
