"""Per-sample TTA latency: vlprompt's episodic loop against the RLCF reference's pass structure (JSON).

    python benchmarks/tta.py                      # embedded world: vlprompt-tiny policy, vlprompt-small reward
    python benchmarks/tta.py --policy ViT-B-16 --reward ViT-L-14 --pretrained none --classes imagenet-a \
        --samples 4 --queries 4 --device cuda

Both loops adapt the same samples, from the same views and the same starting weights, with the same losses; only
the pass structure differs. *reference* replays what the RLCF code runs per sample (its spec, section 6):

- encoder tuning: step 0 forwards all N views with the autograd graph kept (the backward runs through all N),
  then the S kept views per later step and the centre view at the end (64 + 2*6 + 1 = 77 vision passes);
- prompt tuning: every pass re-encodes its views (64 + 6 + 6 + 1 images) and runs every class prompt at the full
  context length, forward and backward;
- both: the tuned tensors are reset with ``load_state_dict`` and the optimizer with a saved pristine state;
- retrieval: the whole CLIP state dict is reloaded per query, the query's reward features are computed per query,
  captions run at the full context length and the text->image direction tunes the whole token-embedding table.

*ours* is the library's path (``vlprompt.runners.tta`` with the methods' ``begin/loss/predict``): a no-grad
selection pass over the N views, then grad passes on the S kept views; the prompt variant encodes the views once
per sample and cuts class prompts after their end-of-text token; reward features of all queries are computed in
one batch (their cost is added to ours per query); in-place restore of the tuned tensors only; text->image trains
only the query's embedding rows. Seconds are means over the timed samples after one warm-up sample; ``agree`` is
the fraction of samples whose top-1 prediction is the same in both loops.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import emit, environment, peak_memory_mb, reset_peak_memory
from PIL import Image

import vlprompt
from vlprompt.config import TTAConfig
from vlprompt.data.classnames import load_class_names
from vlprompt.data.karpathy import load_gallery
from vlprompt.data.views import TTAViews
from vlprompt.data.world import layout
from vlprompt.methods import build_method
from vlprompt.methods.rlcf import RewardCLIP
from vlprompt.methods.tpt import Episode, confident_views
from vlprompt.runners.tta import EpisodicState, adapt, fast_cpu_math, load_reward, make_optimizer

#: variant -> (method section, tta settings): the paper's hyperparameters.
VARIANTS = {
    "tpt_prompt": ({"name": "tpt", "tune": "prompt"}, {"steps": 1, "lr": 5e-3, "weight_decay": 0.01}),
    "rlcf_prompt": ({"name": "rlcf", "tune": "prompt", "sample_k": 3}, {"steps": 3, "lr": 7e-3}),
    "rlcf_encoder": ({"name": "rlcf", "tune": "encoder", "sample_k": 3}, {"steps": 3, "lr": 1e-5}),
    "rlcf_i2t": (
        {"name": "rlcf_retrieval", "direction": "i2t", "sample_k": 16},
        {"steps": 8, "lr": 1e-6, "eps": 1e-6},
    ),
    "rlcf_t2i": (
        {"name": "rlcf_retrieval", "direction": "t2i", "sample_k": 12},
        {"steps": 8, "lr": 1e-6, "eps": 1e-6},
    ),
}


_SHARED: dict[str, RewardCLIP] = {}


class PassCounter:
    """Counts the images and text rows each tower encodes (forward hooks), per loop."""

    def __init__(self, backbone: vlprompt.Backbone, reward: RewardCLIP | None) -> None:
        self.counts = {"vision_images": 0, "text_rows": 0, "reward_images": 0}
        backbone.vision.register_forward_hook(self._hook("vision_images"))
        backbone.text.register_forward_hook(self._hook("text_rows"))
        for m in reward.models if reward is not None else []:
            m.model.visual.register_forward_hook(self._hook("reward_images"))

    def _hook(self, key: str) -> Callable:
        def hook(module, inputs, output) -> None:
            self.counts[key] += inputs[0].shape[0]

        return hook

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return out


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build(section: dict, args: argparse.Namespace, device: torch.device):
    """Policy method (seeded, so two builds hold the same weights) with its reward model attached."""
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone(args.policy, args.pretrained, device=device)
    method = build_method(section, backbone).to(device)
    if "reward" not in _SHARED:  # one reward model for every variant
        torch.manual_seed(1)
        _SHARED["reward"] = RewardCLIP([load_reward(args.reward, args.pretrained, device)])
    if hasattr(method, "attach_reward"):
        method.attach_reward(_SHARED["reward"])
    method.eval()
    return method


# ---- classification --------------------------------------------------------------------------------------
def classification_views(method, args: argparse.Namespace) -> list[torch.Tensor]:
    """The views of the first samples of a world test tree, seeded per sample as the engine seeds them."""
    root = layout.classification_root(args.world, args.domain, "test")
    files = sorted(root.glob("*/*.png"))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()[: args.samples + 1]
    b = method.backbone
    make = TTAViews(b.image_size, args.views, b.image_mean, b.image_std)
    device = b.device
    return [make(Image.open(files[i]).convert("RGB"), torch.Generator().manual_seed(i)).to(device) for i in order]


def ours_classification(method, views: list[torch.Tensor], tta: TTAConfig, device) -> tuple[list, list]:
    """The engine's loop body: begin (no-grad selection), adapt, predict, in-place restore."""
    optimizer = make_optimizer(method.trainable_parameters(), tta)
    state = EpisodicState(method.trainable_parameters(), optimizer)
    preds, seconds = [], []
    for v in views:
        start = synced(device)
        episode = method.begin(v, tta.selection)
        adapt(method, episode, tta.steps, optimizer)
        preds.append(method.predict(episode).cpu())
        state.finish_sample()
        seconds.append(synced(device) - start)
    return preds, seconds


def reference_logits(method, views: torch.Tensor) -> torch.Tensor:
    """One reference pass: the prompt variant re-encodes the views (no grad) and runs full-length class prompts."""
    if method.context is not None:
        with torch.no_grad():
            images = method.encode_views(views)
        return method.logits(images, method.text_features())
    return method.logits(method.encode_views(views), method.class_features())


def reference_classification(method, views: list[torch.Tensor], tta: TTAConfig, device) -> tuple[list, list]:
    """The reference's passes: graph over all N views at step 0, re-encoding, load_state_dict resets."""
    params = method.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=tta.lr, weight_decay=tta.weight_decay, eps=tta.eps)
    pristine = copy.deepcopy(optimizer.state_dict())
    visual = method.backbone.vision.visual
    saved = copy.deepcopy(visual.state_dict()) if method.context is None else None
    initial_ctx = method.context.ctx.detach().clone() if method.context is not None else None
    method.truncate_text = False
    preds, seconds = [], []
    for v in views:
        start = synced(device)
        if saved is not None:
            visual.load_state_dict(saved)
        else:
            with torch.no_grad():
                method.context.ctx.copy_(initial_ctx)
        optimizer.load_state_dict(pristine)
        episode = Episode(v)
        for _ in range(tta.steps):
            if episode.selected is None:
                everything = reference_logits(method, v)  # step 0: all N views (with graph for the encoder)
                episode.selected = confident_views(everything.detach(), tta.selection)
                method.on_selected(episode)
                logits = everything[episode.selected]
            else:
                logits = reference_logits(method, v[episode.selected])
            loss = method.objective(episode, logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            preds.append(reference_logits(method, v[:1])[0].float().cpu())
        seconds.append(synced(device) - start)
    method.truncate_text = True
    if saved is not None:
        visual.load_state_dict(saved)
    else:
        with torch.no_grad():
            method.context.ctx.copy_(initial_ctx)
    return preds, seconds


# ---- retrieval -------------------------------------------------------------------------------------------
def retrieval_data(method, args: argparse.Namespace):
    """World retrieval test set: image tensors, caption tokens, and the candidates' features (computed once)."""
    gallery = load_gallery(layout.retrieval_file(args.world, "test", args.domain), args.world)
    b = method.backbone
    images = torch.stack([b.preprocess_val(Image.open(p).convert("RGB")) for p in gallery.image_paths]).to(b.device)
    tokens = b.tokenize(gallery.captions)
    reward = method.reward
    with torch.no_grad():
        feats = {
            "images": torch.cat([F.normalize(b.encode_image(x), dim=-1) for x in images.split(128)]),
            "texts": torch.cat([F.normalize(b.encode_text(t), dim=-1) for t in tokens.split(256)]),
            "reward_images": [
                torch.cat(f)
                for f in zip(*(reward.image_features(x, b.image_mean, b.image_std) for x in images.split(128)))
            ],  # fmt: skip
            "reward_texts": reward.text_features(gallery.captions),
        }
    return gallery, images, tokens, feats


def set_candidates(method, feats: dict) -> None:
    if method.options.direction == "i2t":
        method.set_candidates(feats["texts"], feats["reward_texts"])
    else:
        method.set_candidates(feats["images"], feats["reward_images"])


def ours_retrieval(method, queries: list, captions: list[str], tta: TTAConfig, device) -> tuple[list, list]:
    """Reward features of all queries in one batch (cost shared out), then episodes with in-place restore."""
    b, reward = method.backbone, method.reward
    start = synced(device)
    if method.options.direction == "i2t":
        reward_q = reward.image_features(torch.cat(queries), b.image_mean, b.image_std)
    else:
        reward_q = reward.text_features(captions)
    shared = (synced(device) - start) / len(queries)
    optimizer = make_optimizer(method.trainable_parameters(), tta)
    state = EpisodicState(method.trainable_parameters(), optimizer)
    preds, seconds = [], []
    for i, q in enumerate(queries):
        start = synced(device)
        episode = method.begin(q, [f[i : i + 1] for f in reward_q])
        adapt(method, episode, tta.steps, optimizer)
        preds.append(method.predict(episode).cpu())
        state.finish_sample()
        seconds.append(synced(device) - start + shared)
    return preds, seconds


def reference_retrieval(method, queries: list, captions: list[str], tta: TTAConfig, device) -> tuple[list, list]:
    """Whole state dict reloaded per query, per-query reward features, full-length captions, dense embeddings."""
    b, reward, model = method.backbone, method.reward, method.backbone.model
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=tta.lr, weight_decay=tta.weight_decay, eps=tta.eps)
    pristine = copy.deepcopy(optimizer.state_dict())
    initial = copy.deepcopy(model.state_dict())
    method.truncate_text = False
    preds, seconds = [], []
    for q, caption in zip(queries, captions):
        start = synced(device)
        if method.options.direction == "i2t":
            reward_q = reward.image_features(q, b.image_mean, b.image_std)
        else:
            reward_q = reward.text_features([caption])
        episode = method.begin(q, reward_q)
        for step in range(tta.steps):
            loss = method.loss(episode, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        preds.append(method.predict(episode).cpu())
        model.load_state_dict(initial)
        optimizer.load_state_dict(pristine)
        seconds.append(synced(device) - start)
    method.truncate_text = True
    return preds, seconds


# ---- driver ----------------------------------------------------------------------------------------------
def compare(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time both loops on the same inputs; report seconds per sample, the ratio, agreement and pass counts."""
    section, settings = VARIANTS[name]
    tta = TTAConfig(**{"selection": 0.1, "views": args.views, "weight_decay": 5e-4, **settings})
    method = build(section, args, device)
    if section["name"] == "rlcf_retrieval":
        gallery, images, tokens, feats = retrieval_data(method, args)
        i2t = section["direction"] == "i2t"
        n = args.queries + 1
        order = torch.randperm(len(images) if i2t else len(tokens), generator=torch.Generator().manual_seed(0))
        picked = order[:n].tolist()
        queries = [images[i : i + 1] if i2t else tokens[i : i + 1] for i in picked]
        captions = [gallery.captions[i] for i in picked] if not i2t else [""] * n
        reference_method = build({**section, "embedding_rows": False}, args, device) if not i2t else method
        set_candidates(method, feats)
        set_candidates(reference_method, feats)
        runs = {"ours": (method, ours_retrieval), "reference": (reference_method, reference_retrieval)}
        inputs = (queries, captions)
    else:
        names = load_class_names(str(layout.classes_file(args.world)) if args.classes == "world" else args.classes)
        method.set_classes(list(names.names))
        views = classification_views(method, args)
        runs = {"ours": (method, ours_classification), "reference": (method, reference_classification)}
        inputs = (views,)
    out = {}
    for loop, (m, fn) in runs.items():
        counter = PassCounter(m.backbone, getattr(m, "reward", None))
        reset_peak_memory(device)
        preds, seconds = fn(m, *inputs, tta, device)
        counts = counter.take()
        timed = seconds[1:]  # the first sample warms up
        out[loop] = {
            "seconds_per_sample": round(sum(timed) / len(timed), 4),
            "preds": preds,
            **{f"{k}_per_sample": round(v / len(seconds), 1) for k, v in counts.items()},
            "peak_memory_mb": round(peak_memory_mb(device), 1),
        }
    ours, ref = out["ours"].pop("preds"), out["reference"].pop("preds")
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(ours, ref)) / len(ours)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    speedup = out["reference"]["seconds_per_sample"] / out["ours"]["seconds_per_sample"]
    return {**out, "speedup": round(speedup, 2), "agree": agree, "max_abs_score_diff": diff, "samples": len(ours) - 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="vlprompt-tiny")
    p.add_argument("--reward", default="vlprompt-small")
    p.add_argument("--pretrained", default="world", help="weights of both models ('none' = random init)")
    p.add_argument("--world", type=Path, default=Path("world"))
    p.add_argument("--domain", default="sketch")
    p.add_argument("--classes", default="world", help="world, or class names such as imagenet-a / imagenet")
    p.add_argument("--samples", type=int, default=8, help="timed classification samples (after one warm-up)")
    p.add_argument("--queries", type=int, default=8, help="timed retrieval queries (after one warm-up)")
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    args.pretrained = None if args.pretrained in ("none", "") else args.pretrained
    device = torch.device(args.device)
    fast_cpu_math()
    results = {name: compare(name, args, device) for name in args.variants.split(",")}
    report = {"benchmark": "tta", "policy": args.policy, "reward": args.reward, "pretrained": args.pretrained,
              "classes": args.classes, "views": args.views, **environment(device), "results": results}  # fmt: skip
    emit(report, args.out)


if __name__ == "__main__":
    main()
