"""The recipe of the embedded world's shipped captioner (``vlprompt-world-lm``, ``-clipcap``, ``-capdec``).

1. :func:`pretrain_world_lm`: a tiny OPT (:func:`~vlprompt.backbone.embedded_captioner.world_lm_config`) trained
   from random initialisation as a plain causal LM on the captions of the world's **base training part** (the part
   the shipped tiny CLIPs were trained on; never a test set), reading open_clip's BPE through a compact vocabulary
   (the BPE tokens of those captions). Each caption starts at a random position offset, so that every position a
   prefix can push it to (``prefix_length`` + BOS) has been trained.
2. Two mappers on that frozen LM through :func:`~vlprompt.runners.caption.train_captioner` (the trainer, run
   directories, checkpoints): ClipCap on ``vlprompt-tiny`` (world weights) image embeddings and CapDec on its text
   embeddings + noise (``configs/world/clipcap.yaml``, ``capdec.yaml``), on the same base training captions.
3. The three files written compactly (fp16, :mod:`~vlprompt.backbone.embedded_captioner`), then measured on exactly
   that stored form (:func:`measure`: :func:`~vlprompt.runners.caption.caption_images` on each test domain) into the
   model card ``vlprompt-world-captioner.json``.

``python -m vlprompt.runners.world_captioner --world WORLD`` runs all three steps (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt.backbone.captioner import CaptionTokenizer, load_causal_lm
from vlprompt.backbone.embedded_captioner import (
    WORLD_CARD,
    WORLD_LM,
    WORLD_MAPPERS,
    load_world_lm,
    save_mapper_weights,
    save_world_lm,
    world_lm_config,
)
from vlprompt.config import load_config
from vlprompt.core.factory import build_model, seed_everything, visual_spec
from vlprompt.data.media import load_image
from vlprompt.data.sources import data_path
from vlprompt.data.world import build_world, layout
from vlprompt.errors import ConfigError
from vlprompt.methods.captioning import Captioning
from vlprompt.runners.caption import caption_images

log = logging.getLogger(__name__)

#: ``configs/world`` of the source tree (the mapper recipes).
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "world"
#: Which recipe trains which shipped mapper.
MAPPER_RECIPES = {"vlprompt-world-clipcap": "clipcap", "vlprompt-world-capdec": "capdec"}
#: coco-caption metrics of the model card (SPICE needs CoreNLP jars that are not installed here).
CARD_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
#: Test images of the small world's card check (``reproduce``).
REPRODUCE_IMAGES = 8


def base_captions(world: Path) -> list[str]:
    """Every caption of the world's base training part (what the tiny CLIPs were pretrained on)."""
    records = json.loads(layout.base_retrieval_file(world, "train").read_text())
    return [c for r in records for c in (r["caption"] if isinstance(r["caption"], list) else [r["caption"]])]


def compact_vocabulary(texts: list[str]) -> list[int]:
    """The BPE ids ``texts`` use plus CLIP's start/end-of-text, sorted: row ``i`` of the LM is BPE id ``[i]``."""
    bpe = CaptionTokenizer.clip_bpe()
    ids = {i for row in bpe.encode(texts) for i in row}
    return sorted(ids | {bpe.bos_id, bpe.eos_id})


def pretrain_world_lm(
    captions: list[str],
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    positions: int = 128,
    max_offset: int = 32,
) -> tuple[torch.nn.Module, list[int], dict[str, Any]]:
    """Train the world LM on ``captions`` (``[BOS ; tokens] -> [tokens ; eos]``, AdamW, warm-up + cosine); each
    caption is placed at a random position offset in ``[0, max_offset]``. Returns (LM, vocabulary, stats)."""
    seed_everything(seed)
    vocabulary = compact_vocabulary(captions)
    tok = CaptionTokenizer.clip_bpe(vocabulary)
    model = load_causal_lm(world_lm_config(len(vocabulary), tok.bos_id, tok.eos_id, width, layers,
                                                       heads, positions))  # fmt: skip
    encoded = tok.encode(captions)
    longest = max(len(t) for t in encoded) + 1
    if max_offset + longest > positions:
        raise ConfigError(f"captions of {longest} tokens at offsets up to {max_offset} exceed {positions} positions")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, steps // 20, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        pick = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        rows = [encoded[i] for i in pick]
        width_ = max(len(r) for r in rows) + 1
        ids = torch.full((batch_size, width_), tok.pad_id)
        targets = torch.full((batch_size, width_), -100)
        mask = torch.zeros(batch_size, width_, dtype=torch.long)
        for n, r in enumerate(rows):
            ids[n, : len(r) + 1] = torch.tensor([tok.bos_id, *r])
            targets[n, : len(r) + 1] = torch.tensor([*r, tok.eos_id])
            mask[n, : len(r) + 1] = 1
        offset = torch.randint(max_offset + 1, (batch_size, 1), generator=gen)
        position_ids = offset + torch.arange(width_)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("world LM step %d/%d loss %.3f", step, steps, losses[-1])
    model.eval()
    stats = {"final_loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 4),
             "train_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    return model, vocabulary, stats


def mapper_overrides(world: Path, lm: str | Path, mapper: str | Path | None = None) -> list[str]:
    """Overrides pointing a world captioning recipe at a world folder, an LM file and (optionally) mapper weights."""
    out = [f"data.root={world}", f"method.lm={lm}"]
    return out + ([f"method.mapper_weights={mapper}"] if mapper else [])


@torch.no_grad()
def _frozen_embeddings(method: Captioning, world: Path, records: list[dict], text: bool, batch: int = 256) -> Tensor:
    """The frozen CLIP's embeddings of every record's caption (text) or of every distinct image (images)."""
    if text:
        texts = [r["caption"] for r in records]
        return torch.cat([method.encode_text(texts[i : i + batch]) for i in range(0, len(texts), batch)])
    transform = visual_spec(method.backbone).image_eval
    images = list(dict.fromkeys(r["image"] for r in records))
    out = []
    for i in range(0, len(images), batch):
        pixels = torch.stack([transform(load_image(world / p)) for p in images[i : i + batch]])
        out.append(method.clip_embedding(pixels))
    return torch.cat(out)


def train_mapper(
    recipe: str, world: Path, lm: str | Path, overrides: list[str] = (), seed: int = 0
) -> tuple[Captioning, dict[str, Any]]:
    """Train ``configs/world/<recipe>.yaml``'s mapper on the frozen LM ``lm`` (its steps, batch, lr, warm-up).

    As ClipCap's own recipe does (its ``parse_coco.py``), the frozen CLIP encodes every training image (ClipCap) or
    caption (CapDec) once, and each step computes the method's own loss
    (:meth:`~vlprompt.methods.captioning.Captioning.embedding_loss`: CapDec's fresh noise, teacher-forced CE) on
    a batch of (embedding, caption) pairs: the same loss as ``vlprompt train`` on that config, at a fraction of its
    cost on two CPU cores (where re-encoding the images every step dominates)."""
    cfg = load_config(CONFIGS / f"{recipe}.yaml", [*mapper_overrides(world, lm), f"seed={seed}", *overrides])
    seed_everything(cfg.seed)
    method = build_model(cfg, torch.device("cpu"))
    if not isinstance(method, Captioning):
        raise ConfigError(f"{recipe}: method {cfg.method.get('name')!r} does not train a mapper")
    records = [{"image": r["image"], "caption": c}
               for r in json.loads(data_path(cfg.data, cfg.data.train).read_text())
               for c in (r["caption"] if isinstance(r["caption"], list) else [r["caption"]])]  # fmt: skip
    start = time.perf_counter()
    emb = _frozen_embeddings(method, world, records, method.text_only)
    if method.text_only:
        index = torch.arange(len(records))
    else:
        order = {p: i for i, p in enumerate(dict.fromkeys(r["image"] for r in records))}
        index = torch.tensor([order[r["image"]] for r in records])
    encode_seconds = time.perf_counter() - start
    t = cfg.train
    params = method.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = _warmup_cosine(opt, t.warmup_steps, t.max_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    method.generator = gen
    method.train()
    losses = []
    for _ in range(t.max_steps):
        pick = torch.randint(len(records), (t.batch_size,), generator=gen)
        forcing = method.tokenize([records[i]["caption"] for i in pick.tolist()])["forcing"]
        loss = method.embedding_loss(emb[index[pick]], forcing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    method.eval()
    stats = {"steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr, "warmup_steps": t.warmup_steps,
             "final_loss_mean_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
             "encode_seconds": round(encode_seconds, 1),
             "train_seconds": round(time.perf_counter() - start - encode_seconds, 1)}  # fmt: skip
    return method, stats


def _warmup_cosine(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    warmup = max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )


def export_mapper(method: Captioning, recipe: str, path: Path, metadata: dict[str, str]) -> None:
    """Write a trained mapper and the options that shape it as a compact world mapper file."""
    o = method.options
    shape = {"recipe": recipe, "mapper": o.mapper, "prefix_length": o.prefix_length, "clip_length": o.clip_length,
             "mapper_layers": o.mapper_layers, "mapper_heads": o.mapper_heads}  # fmt: skip
    save_mapper_weights(method.captioner.mapper.state_dict(), shape, path, metadata)


def measure(world: Path, recipe: str, lm: str | Path, mapper: str | Path, out: Path, domains: list[str],
            images: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Caption each domain's test images with the stored LM + mapper (beam 5, no adaptation): coco-caption metrics,
    CLIPScore / RefCLIPScore (evaluation CLIP: the policy ``vlprompt-tiny``) and seconds per image per domain.
    ``images`` limits each domain to its first N images."""
    report = {}
    for domain in domains:
        ann = layout.retrieval_file(world, "test", domain)
        if images:
            subset = out / f"test_{domain}_{images}.json"
            subset.parent.mkdir(parents=True, exist_ok=True)
            subset.write_text(json.dumps(json.loads(ann.read_text())[:images]))
            ann = subset
        summary = caption_images(CONFIGS / f"{recipe}.yaml", mapper_overrides(world, lm, mapper), annotations=ann,
                                 image_root=world, tta="none", out=out / f"{recipe}_{domain}",
                                 metrics=CARD_METRICS)  # fmt: skip
        m = summary["metrics"][next(iter(summary["metrics"]))]
        keep = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore")
        report[domain] = {k: round(m[k], 4) for k in keep if m.get(k) is not None} | {
            "images": m["images"], "seconds_per_image": round(summary["seconds_per_image"], 4)}  # fmt: skip
    return report


def lm_size(path: Path) -> dict[str, Any]:
    """The stored LM's shape facts for the model card."""
    model, vocabulary = load_world_lm(path)
    c = model.config
    return {"type": "OPT", "layers": c.num_hidden_layers, "width": c.hidden_size, "heads": c.num_attention_heads,
            "ffn": c.ffn_dim, "positions": c.max_position_embeddings, "vocabulary_rows": len(vocabulary),
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


def build_world_captioner(world: Path, out: Path, seed: int = 0, images: int | None = None,
                          measure_only: bool = False) -> dict[str, Any]:  # fmt: skip
    """The whole recipe (module docstring): LM, both mappers, their files in ``out`` and the model card measured
    on them (``images``: the first N test images per domain; None = all). ``measure_only``: re-measure the files
    already in ``out``."""
    world, out = Path(world).resolve(), Path(out)
    lm_path = out / f"{WORLD_LM}.safetensors"
    world_meta = json.loads(layout.world_meta_file(world).read_text())
    meta = {"world_seed": str(world_meta.get("seed")), "world_version": str(world_meta.get("version")),
            "world_size": str(world_meta.get("size")), "seed": str(seed)}  # fmt: skip
    files = [f"{n}.safetensors" for n in (WORLD_LM, *WORLD_MAPPERS)]
    card: dict[str, Any] = {"name": WORLD_CARD, **meta, "files": files, "tokenizer": TOKENIZER_NOTE, "data": DATA_NOTE}
    old = out / f"{WORLD_CARD}.json"
    if measure_only and old.exists():
        card = {**json.loads(old.read_text()), **card}
    if not measure_only:
        model, vocabulary, stats = pretrain_world_lm(base_captions(world), seed=seed)
        save_world_lm(model, vocabulary, lm_path, meta)
        card["lm"] = {"recipe": LM_RECIPE, **stats}
        for name, recipe in MAPPER_RECIPES.items():
            method, stats = train_mapper(recipe, world, lm_path, seed=seed)
            export_mapper(method, recipe, out / f"{name}.safetensors", meta)
            card[name] = {"recipe": f"configs/world/{recipe}.yaml", **stats}
    card.setdefault("lm", {})["shape"] = lm_size(lm_path)
    domains = list(layout.DOMAINS)
    with tempfile.TemporaryDirectory() as scratch:  # captions and subsets, not shipped
        for name, recipe in MAPPER_RECIPES.items():
            card.setdefault(name, {})["test"] = measure(world, recipe, lm_path, out / f"{name}.safetensors",
                                                         Path(scratch) / name, domains, images)  # fmt: skip
        # a number anyone (and the test suite) can recompute in seconds: the small world of the same seed
        small = Path(scratch) / "small_world"
        build_world(small, seed=int(world_meta.get("seed", 0)), size="small", workers=1)
        name = WORLD_MAPPERS[0]
        check = measure(small, MAPPER_RECIPES[name], lm_path, out / f"{name}.safetensors", Path(scratch) / "check",
                        ["clean"], REPRODUCE_IMAGES)["clean"]  # fmt: skip
        card["reproduce"] = {"world": f"vlprompt world build --size small --seed {world_meta.get('seed')}",
                             "mapper": name, "domain": "clean", **check}  # fmt: skip
    card["measured_on"] = (
        "the stored fp16 files, beam 5, no adaptation; coco-caption metrics on its scale "
        "(fractions, CIDEr up to 10); CLIPScore / RefCLIPScore by vlprompt-tiny (world) in [0, 2.5]"
        f" / [0, 1]; {'all' if not images else f'the first {images}'} test images per domain"
    )
    card["command"] = f"python -m vlprompt.runners.world_captioner --world WORLD --seed {seed}" + (
        f" --images {images}" if images else "")  # fmt: skip
    (out / f"{WORLD_CARD}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


TOKENIZER_NOTE = (
    "open_clip's bundled BPE (bpe_simple_vocab_16e6.txt.gz, installed with open_clip: nothing downloaded), the same "
    "text reading as the CLIP side, through a compact vocabulary: the LM has one token row per BPE token of the base "
    "training captions (plus CLIP's start/end-of-text), the file maps rows to BPE ids, so no other token can ever be "
    "generated. BOS = CLIP's <start_of_text>, eos = <end_of_text> (the BPE drops whitespace, so there is no newline "
    "token to stop at), pad = eos (always masked)."
)
DATA_NOTE = ("LM and both mappers trained on retrieval/base_train.json only (the clean base part the shipped tiny "
             "CLIPs were pretrained on); never on a test set.")  # fmt: skip
LM_RECIPE = "pretrain_world_lm defaults: 400 steps, batch 32, AdamW lr 3e-3 wd 0.01, warm-up 5% + cosine, offsets 0-32"


def main(argv: list[str] | None = None) -> None:
    """``python -m vlprompt.runners.world_captioner``: the shipped world captioner's recipe."""
    parser = argparse.ArgumentParser(prog="python -m vlprompt.runners.world_captioner", description=__doc__)
    parser.add_argument("--world", type=Path, required=True, help="a built world (vlprompt world build)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None, help="test images per domain for the card (all)")
    parser.add_argument("--measure-only", action="store_true", help="re-measure the files already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    card = build_world_captioner(args.world, args.out, args.seed, args.images, args.measure_only)
    print(json.dumps({k: card[k].get("test") for k in MAPPER_RECIPES}, indent=1))


if __name__ == "__main__":
    main()
