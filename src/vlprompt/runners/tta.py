"""Episodic test-time adaptation: adapt on one test sample, predict it, restore, go on to the next.

Per sample: build the views (one batch), let the method select and adapt for ``tta.steps`` AdamW steps, predict,
then restore the trainable tensors in place and zero the optimizer state, so every sample starts from the same
point (bit for bit, tested) without ever copying the model. RLCF-S-M's momentum averaging moves that start point
every ``momentum_every`` samples; nothing else carries over between samples.

Sample order is a seeded permutation and each sample's views come from a generator seeded by the sample's index,
so episodic results do not depend on the order (and DataLoader workers may build the views).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlprompt.backbone.loading import create_clip
from vlprompt.config import Config, TTAConfig
from vlprompt.core.factory import build_model, resolve_device, seed_everything, visual_spec
from vlprompt.core.rundir import prepare_run_dir, tracked_run, write_json
from vlprompt.core.tracking import open_tracker
from vlprompt.data.sources import classification_set, eval_set
from vlprompt.data.views import TTAViews
from vlprompt.errors import ConfigError, DataError
from vlprompt.eval import invert_ground_truth, ranks_from_similarity, retrieval_metrics
from vlprompt.methods import Method
from vlprompt.methods.rlcf import RewardCLIP, RewardEncoder, RLCFRetrieval


def fast_cpu_math() -> None:
    """Flush denormal floats to zero: TTA gradients reach denormal range and are then ~20x slower on CPU."""
    torch.set_flush_denormal(True)


def make_optimizer(params: list[Tensor], tta: TTAConfig) -> torch.optim.AdamW:
    """AdamW over all trainable tensors, weight decay on every one of them (as the reference)."""
    return torch.optim.AdamW(params, lr=tta.lr, weight_decay=tta.weight_decay, eps=tta.eps)


class EpisodicState:
    """Snapshot of the trainable tensors only, restored in place after every sample; optional momentum average.

    Restoring zeroes the optimizer's state tensors in place, which is bit-identical to a fresh AdamW (whose state
    starts at zero with step 0) and allocates nothing per sample.
    """

    def __init__(
        self,
        params: list[Tensor],
        optimizer: torch.optim.Optimizer,
        momentum: float | None = None,
        every: int = 64,
        weight: float = 1.0,
    ) -> None:
        self.params = params
        self.optimizer = optimizer
        with torch.no_grad():
            self.start = [p.detach().clone() for p in params]  # where every sample starts
            self.initial = [t.clone() for t in self.start] if momentum is not None else None
            self.average = [t.clone() for t in self.start] if momentum is not None else None
        self.momentum, self.every, self.weight = momentum, every, weight
        self.samples = 0

    @torch.no_grad()
    def restore(self) -> None:
        """Trainable tensors back to the start point; optimizer state back to zero (no allocation)."""
        torch._foreach_copy_(self.params, self.start)
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
        if state:
            torch._foreach_zero_(state)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def finish_sample(self) -> None:
        """After a sample's prediction: update the momentum average (RLCF-S-M), then restore."""
        if self.average is not None:
            torch._foreach_mul_(self.average, self.momentum)
            torch._foreach_add_(self.average, [p.detach() for p in self.params], alpha=1.0 - self.momentum)
            self.samples += 1
            if self.samples % self.every == 0:
                torch._foreach_copy_(self.start, self.initial)
                torch._foreach_mul_(self.start, 1.0 - self.weight)
                torch._foreach_add_(self.start, self.average, alpha=self.weight)
        self.restore()


def episodic_state(method: Method, optimizer: torch.optim.Optimizer, tta: TTAConfig) -> EpisodicState:
    """The restore/momentum bookkeeping for ``method``'s trainable tensors."""
    m = tta.momentum_m if tta.momentum else None
    return EpisodicState(method.trainable_parameters(), optimizer, m, tta.momentum_every, tta.momentum_weight)


def autocast_for(device: torch.device, mode: str):
    """bf16 autocast (no loss scaler needed) or nothing; fp16 is not offered (its scaler can skip steps)."""
    if mode not in ("none", "bf16"):
        raise ConfigError(f"tta.autocast must be 'none' or 'bf16', got {mode!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def adapt(method: Any, episode: Any, steps: int, optimizer: torch.optim.Optimizer) -> None:
    """``steps`` AdamW steps on the method's loss for one episode."""
    for step in range(steps):
        loss = method.loss(episode, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ---- classification --------------------------------------------------------------------------------------
class SampleViews(Dataset):
    """Item ``i`` = (views of image ``i``, label); the views' randomness is seeded by ``(seed, i)``."""

    def __init__(self, data: Dataset, views: Callable, seed: int) -> None:
        self.data, self.views, self.seed = data, views, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        item = self.data[i]
        if item is None:
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return self.views(item[0], generator), item[1]


def sample_order(n: int, tta: TTAConfig, seed: int) -> list[int]:
    """Seeded order of the test samples, cut to ``tta.max_samples``."""
    order = list(range(n))
    if tta.shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[: tta.max_samples] if tta.max_samples else order


@dataclass
class TTAOutcome:
    """Per-sample outputs of a TTA run and the wall time of its per-sample loop."""

    scores: list[Tensor] = field(default_factory=list)  # classification: logits [C]; retrieval: similarities [M]
    labels: list[int] = field(default_factory=list)  # classification labels or query indices
    before: list[Tensor] = field(default_factory=list)  # the same outputs before adaptation (when it adapts)
    loop_seconds: float = 0.0  # the per-sample loop only (views, adaptation, prediction), no setup

    @property
    def seconds_adapt_per_sample(self) -> float:
        """Loop time per sample: building its views, adapting and predicting."""
        return self.loop_seconds / max(1, len(self.scores))


def _progress(total: int, enabled: bool, label: str) -> Progress:
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())  # fmt: skip
    return Progress(*columns, disable=not enabled, transient=False)


def run_classification(
    method: Any, data: Dataset, cfg: Config, device: torch.device, progress: bool = False, label: str = "tta"
) -> TTAOutcome:
    """Adapt on and predict every sample of ``data`` (items (views, label)), in ``sample_order``."""
    tta = cfg.tta
    order = sample_order(len(data), tta, cfg.seed)
    optimizer = make_optimizer(method.trainable_parameters(), tta) if tta.steps else None
    state = episodic_state(method, optimizer, tta) if optimizer is not None else None
    loader = DataLoader(data, batch_size=None, sampler=order, num_workers=cfg.data.num_workers)
    out = TTAOutcome()
    method.eval()
    correct = 0
    start = time.perf_counter()
    with _progress(len(order), progress, label) as bar:
        task = bar.add_task(label, total=len(order), info="")
        for item in loader:
            if item is None:
                continue
            views, y = item
            views = views.to(device, non_blocking=True)
            with autocast_for(device, tta.autocast):
                episode = method.begin(views, tta.selection, adapt=bool(tta.steps))
                if tta.steps:
                    adapt(method, episode, tta.steps, optimizer)
                logits = method.predict(episode)
            if state is not None:
                state.finish_sample()
            out.scores.append(logits.cpu())
            if episode.before is not None:
                out.before.append(episode.before.cpu())
            out.labels.append(int(y))
            correct += int(logits.argmax()) == int(y)
            bar.update(task, advance=1, info=f"acc {100.0 * correct / len(out.labels):.1f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out.loop_seconds = time.perf_counter() - start
    return out


def classification_metrics(out: TTAOutcome) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and time per sample."""
    if not out.scores:
        raise ConfigError("no test sample could be read")
    scores, labels = torch.stack(out.scores), torch.tensor(out.labels)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        "cls/top1": 100.0 * (top[:, 0] == labels).float().mean().item(),
        "cls/top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item(),
        "samples": len(labels),
        "seconds_adapt_per_sample": out.seconds_adapt_per_sample,
    }


def adaptation_gain(adapted: dict[str, float], before: dict[str, float]) -> dict[str, dict[str, float]]:
    """``before_adaptation``: the accuracy and recall metrics (``cls/top1``, ``t2i/R@5``...) of the start point's
    predictions, which step 0 computes anyway (the zero-shot model unless ``tta.momentum`` moves the start), on the
    centre view (classification: the view a 0-step run predicts from); ``gain``: adapted minus that."""
    keys = [k for k in before if "/top" in k or "/R@" in k]
    return {"before_adaptation": {k: before[k] for k in keys}, "gain": {k: adapted[k] - before[k] for k in keys}}


# ---- retrieval -------------------------------------------------------------------------------------------
def clean_caption(text: str, max_words: int = 50) -> str:
    """The reference's caption preprocessing (LAVIS): lower case, ``.!"()*#:;~`` to spaces, at most 50 words."""
    text = re.sub(r"\s{2,}", " ", re.sub(r'([.!"()*#:;~])', " ", text.lower())).strip()
    return " ".join(text.split(" ")[:max_words])


@torch.no_grad()
def _encode_images(encode: Callable[[Tensor], Tensor], dataset: Dataset, n: int, batch: int = 256) -> Tensor:
    feats: list[Tensor | None] = [None] * n
    for items in DataLoader(dataset, batch_size=batch, collate_fn=lambda b: [x for x in b if x is not None]):
        if items:
            images = torch.stack([x[0] for x in items])
            for i, f in zip([x[1] for x in items], encode(images)):
                feats[i] = f
    if any(f is None for f in feats):
        raise DataError("some gallery images could not be read; TTA retrieval needs every one")
    return torch.stack(feats)


def run_retrieval(method: RLCFRetrieval, cfg: Config, device: torch.device, progress: bool = False) -> dict:
    """RLCF retrieval (one direction): cached candidates, one adapted query at a time; returns metrics."""
    tta = cfg.tta
    spec = visual_spec(method.backbone)
    gallery = eval_set(cfg.data, "test", spec)
    if gallery is None:
        raise ConfigError("data.test is empty: give the retrieval annotation file to adapt on")
    b = method.backbone
    i2t = method.options.direction == "i2t"
    captions = [clean_caption(c) for c in gallery.captions]
    with torch.no_grad():
        image_feats = _encode_images(lambda x: F.normalize(b.encode_image(x.to(device)), dim=-1).float(),
                                     gallery.dataset, gallery.num_visual)  # fmt: skip
        tokens = b.tokenize(captions, cfg.data.max_words or None)
        text_feats = torch.cat([F.normalize(b.encode_text(tokens[i : i + 512]), dim=-1).float()
                                for i in range(0, len(tokens), 512)])  # fmt: skip
    reward = method.reward if tta.steps else None
    reward_images = reward_texts = None
    if reward is not None:  # every reward feature once per run, batched (the reference: once per query)
        mean, std = b.image_mean, b.image_std
        per_model = _encode_images(lambda x: torch.cat(reward.image_features(x.to(device), mean, std), dim=1),
                                   gallery.dataset, gallery.num_visual)  # fmt: skip
        reward_images = list(per_model.split([m.embed_dim for m in reward.models], dim=1))
        reward_texts = reward.text_features(captions)
    if i2t:
        method.set_candidates(text_feats, reward_texts or [])
        n_queries, gt = gallery.num_visual, invert_ground_truth(gallery.txt2vis, len(captions),
                                                                gallery.num_visual)  # fmt: skip
    else:
        method.set_candidates(image_feats, reward_images or [])
        n_queries, gt = len(captions), [[v] for v in gallery.txt2vis]
    order = sample_order(n_queries, tta, cfg.seed)
    optimizer = make_optimizer(method.trainable_parameters(), tta) if tta.steps else None
    state = episodic_state(method, optimizer, tta) if optimizer is not None else None
    method.eval()
    out = TTAOutcome()
    start = time.perf_counter()
    with _progress(len(order), progress, f"tta {method.options.direction}") as bar:
        task = bar.add_task("tta", total=len(order), info="")
        for q in order:
            query = gallery.dataset[q][0].unsqueeze(0) if i2t else tokens[q : q + 1]
            rq = [] if reward is None else [f[q : q + 1] for f in (reward_images if i2t else reward_texts)]
            with autocast_for(device, tta.autocast):
                episode = method.begin(query.to(device), rq)
                if tta.steps:
                    adapt(method, episode, tta.steps, optimizer)
                out.scores.append(method.predict(episode).cpu())
            if state is not None:
                state.finish_sample()
            if episode.before is not None:
                out.before.append(episode.before.cpu())
            out.labels.append(q)
            bar.update(task, advance=1)
    out.loop_seconds = time.perf_counter() - start
    truth = [gt[q] for q in out.labels]
    metrics = retrieval_metrics(ranks_from_similarity(torch.stack(out.scores), truth), method.options.direction)
    result = {**metrics, "samples": len(out.labels), "seconds_adapt_per_sample": out.seconds_adapt_per_sample}
    if out.before:
        before = retrieval_metrics(ranks_from_similarity(torch.stack(out.before), truth), method.options.direction)
        result.update(adaptation_gain(metrics, before))
    return result


# ---- the command -----------------------------------------------------------------------------------------
def load_reward(name: str, pretrained: str | None, device: torch.device, precision: str = "fp32") -> RewardEncoder:
    """A frozen reward CLIP; any open_clip architecture (RLCF-S uses RN50x64, which has no promptable tower)."""
    model, _, _ = create_clip(name, pretrained, device=device, precision=precision)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return RewardEncoder(model, open_clip.get_tokenizer(name), size, mean, std)


def build_tta_method(cfg: Config, device: torch.device) -> Method:
    """The policy (backbone + method) and, when the method has them and adapts, its reward models."""
    method = build_model(cfg, device)
    if cfg.tta.momentum and getattr(method, "rows", None) is not None:
        raise ConfigError("tta.momentum averages the whole token-embedding table: set method.embedding_rows=false")
    specs = getattr(method, "reward_specs", None)
    if specs is not None and cfg.tta.steps:
        models = [load_reward(n, p, device, cfg.backbone.precision) for n, p in specs()]
        method.attach_reward(RewardCLIP(models, method.options.reward_weights))
    if not hasattr(method, "loss"):
        raise ConfigError(f"method {cfg.method.get('name')!r} has no test-time loss; use tpt, rlcf or rlcf_retrieval")
    return method


@tracked_run
def run_tta(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` (classification or retrieval TTA); metrics are also written to ``RUN_DIR/metrics.json``."""
    if cfg.tta.steps < 0:
        raise ConfigError("tta.steps must be >= 0")
    device = resolve_device(cfg.device)
    retrieval = cfg.method.get("name") == "rlcf_retrieval"
    # data problems show before any weights load
    test = None if retrieval else classification_set(cfg.data, cfg.tta.classes)
    fast_cpu_math()
    run_dir = prepare_run_dir(cfg)
    seed_everything(cfg.seed)
    method = build_tta_method(cfg, device)
    start = time.perf_counter()
    if isinstance(method, RLCFRetrieval):
        metrics = run_retrieval(method, cfg, device, progress)
    else:
        method.set_classes(list(test.classes.names))
        b = method.backbone
        views = TTAViews(b.image_size, cfg.tta.views if cfg.tta.steps else 1, b.image_mean, b.image_std,
                         augmix=cfg.tta.augmix)  # fmt: skip
        out = run_classification(method, SampleViews(test, views, cfg.seed), cfg, device, progress)
        metrics = classification_metrics(out)
        if out.before:
            metrics.update(adaptation_gain(metrics, classification_metrics(TTAOutcome(out.before, out.labels))))
    metrics["trainable"] = method.parameter_counts()["trainable"] if cfg.tta.steps else 0
    # total = setup (gallery and reward features, encoded once) + the per-sample loop
    metrics["seconds_total"] = time.perf_counter() - start
    loop = metrics["seconds_adapt_per_sample"] * metrics["samples"]
    metrics["seconds_setup"] = max(0.0, metrics["seconds_total"] - loop)
    write_json(run_dir / "metrics.json", metrics)
    with open_tracker(cfg, run_dir) as tracker:
        tracker.log({"tta": metrics}, int(metrics.get("samples", 0)), "samples")
    return metrics
