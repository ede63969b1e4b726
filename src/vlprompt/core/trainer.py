"""The training loop: one config in, a run directory with metrics and checkpoints out.

Resumable at optimizer-step granularity: the data order of every epoch is a pure function of
``(seed, epoch)``, and checkpoints carry the optimizer, scheduler and RNG states, so a resumed run
ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlprompt.config import Config
from vlprompt.core import distributed
from vlprompt.core.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from vlprompt.core.evaluate import autocast_context, evaluate_retrieval, split_visual_batch
from vlprompt.core.factory import build_model, resolve_device, seed_everything, visual_spec
from vlprompt.core.progress import TrainProgress
from vlprompt.core.rundir import append_metrics, prepare_run_dir, run_dir_for, tracked_run, write_json
from vlprompt.core.tracking import TrainLog, open_tracker
from vlprompt.data import collate_skip_none
from vlprompt.data.sources import EvalSet, eval_set, train_set
from vlprompt.errors import ConfigError
from vlprompt.methods import Method
from vlprompt.run_layout import latest_checkpoint


def make_optimizer(cfg: Config, method: Method) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; no weight decay on gains, biases and embeddings' scales."""
    t = cfg.train
    decay, no_decay = [], []
    for name, p in method.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def make_schedule(
    cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero (or constant)."""
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list, grad_clip: float
) -> None:
    """One update from the accumulated gradients: unscale and clip (if ``grad_clip``), step, clear."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch (a pure function, so resuming replays it exactly)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


class WithSampleIndex(Dataset):
    """A training set whose items carry their own index last: ``(*item, i)`` (``None`` stays ``None``)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        item = self.data[i]
        return None if item is None else (*item, i)


#: What the trainer evaluates the validation and test sets with: ``(method, gallery, cfg) -> metrics`` (numbers;
#: nested dicts and ``None`` allowed). Retrieval by default; a paradigm's runner passes its own (captioning).
Evaluator = Callable[[Method, EvalSet, Config], dict[str, Any]]


def retrieval_evaluator(method: Method, gallery: EvalSet, cfg: Config) -> dict[str, Any]:
    """The default: retrieval metrics of the gallery (:func:`~vlprompt.core.evaluate.evaluate_retrieval`)."""
    return evaluate_retrieval(method, gallery, cfg.train.eval_batch_size, cfg.train.autocast)


class _Interrupt(Exception):
    """Raised by tests to simulate a kill at a given step."""


@tracked_run
def train(
    cfg: Config,
    progress: bool = True,
    interrupt_at_step: int | None = None,
    evaluate: Evaluator = retrieval_evaluator,
) -> dict[str, Any]:
    """Train ``cfg``'s method; returns the final metrics (also written to ``RUN_DIR/metrics.json``); ``evaluate``
    scores the validation and test sets."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give an annotation file to train on (or use `vlprompt eval`)")
    info = distributed.from_environment()  # torchrun's ranks, or one process
    device = distributed.init_process_group(info, resolve_device(cfg.device))
    run_dir = run_dir_for(cfg)
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it or choose another run_name")
    if info.is_main:  # rank 0 alone writes files
        prepare_run_dir(cfg, resuming=checkpoint is not None)
    distributed.barrier(info)
    tracker = open_tracker(cfg, run_dir, enabled=info.is_main)  # log.report_to; rank 0 alone reports
    seed_everything(cfg.seed)

    method = build_model(cfg, device)
    backbone = method.backbone
    spec = visual_spec(backbone)
    # Every annotation file the run reads is parsed here, before the first step: a malformed test file must not
    # surface only after training has finished. Without validation (eval_every=0) data.val is never read, so a
    # template's validation file need not exist.
    pairs = train_set(cfg.data, spec, seed=cfg.seed)
    val = eval_set(cfg.data, "val", spec) if cfg.train.eval_every else None
    test = eval_set(cfg.data, "test", spec)
    # Methods that look up per-sample training data (RVLR's teacher features) get the set once and then each
    # batch's indices: the item's own index in `pairs` (sample_index) and its image index (visual_index).
    bind = getattr(method, "bind_train_set", None)
    if bind is not None:
        bind(pairs, cfg.data)
    loader_set = WithSampleIndex(pairs) if bind is not None else pairs

    t = cfg.train
    micro_per_epoch = len(pairs) // t.batch_size
    steps_per_epoch = micro_per_epoch // t.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(pairs)} training pairs give no full step of batch {t.batch_size} x {t.grad_accum}")
    total_steps = steps_per_epoch * t.epochs if not t.max_steps else min(t.max_steps, steps_per_epoch * t.epochs)
    params = method.trainable_parameters()
    if not params:
        raise ConfigError(
            f"method {cfg.method.get('name')!r} has nothing to train; use `vlprompt eval CONFIG --out RUN_DIR` to "
            "evaluate it and record a run directory that `vlprompt report` compares with trained runs"
        )
    optimizer = make_optimizer(cfg, method)
    schedule = make_schedule(cfg, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=t.autocast == "fp16")

    step, epoch, micro_done = 0, 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, method)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, micro_done = state["step"], state["epoch"], state["micro_done"]
        set_rng_state(state["rng"])

    model = distributed.wrap(method, info, device)  # DDP over ranks; the method itself when single-process

    def checkpoint_now() -> None:
        if not info.is_main:
            return
        save_checkpoint(
            run_dir,
            method,
            {
                "step": step,
                "epoch": epoch,
                "micro_done": micro_done,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
            },
        )

    def validate(epoch: int) -> dict[str, float]:
        metrics = evaluate(method, val, cfg)
        append_metrics(run_dir, {"epoch": epoch, "step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        tracker.log({"val": metrics}, step)
        shown = [k for k, v in metrics.items() if isinstance(v, float) and ("R@1" in k or k in ("CIDEr", "BLEU-4"))]
        display.log(f"epoch {epoch}: " + ", ".join(f"{k} {metrics[k]:.1f}" for k in shown))
        return metrics

    counts = method.parameter_counts()
    tracker.log({"params": counts}, step)
    train_log = TrainLog(tracker, cfg.log.every_steps)
    start = time.perf_counter()
    display = TrainProgress(total_steps, enabled=progress and info.is_main)
    display.advance_to(step)
    with display:
        while epoch < t.epochs and step < total_steps:
            method.train()
            if hasattr(pairs, "set_epoch"):  # video pairs draw their random frames per epoch
                pairs.set_epoch(epoch)
            # whole optimizer steps only, so no gradient of one epoch leaks into the next epoch's first step
            used = steps_per_epoch * t.grad_accum * t.batch_size
            order = epoch_order(len(pairs), cfg.seed, epoch)[micro_done * t.batch_size : used]
            if info.enabled:  # each rank its share of every global batch
                order = distributed.rank_share(order, t.batch_size, info)
            loader = DataLoader(
                loader_set,
                batch_size=t.batch_size // info.world_size,
                sampler=order,
                drop_last=True,
                num_workers=cfg.data.num_workers,
                collate_fn=collate_skip_none,
            )
            for batch in loader:
                micro_done += 1
                if batch is not None:
                    visual, mask, rest = split_visual_batch(batch)
                    captions = rest[0]
                    tokens = method.tokenize(captions)
                    mask = mask.to(device) if mask is not None else None
                    indices = {"visual_index": rest[1], "sample_index": rest[2]} if bind is not None else {}
                    with autocast_context(device, t.autocast):
                        loss = model(visual.to(device), tokens, mask, **indices) / t.grad_accum
                    scaler.scale(loss).backward()
                    value = loss.item() * t.grad_accum
                    display.record(value, len(captions))
                    train_log.record(value)
                if micro_done % t.grad_accum:
                    continue
                optimizer_step(optimizer, scaler, params, t.grad_clip)
                schedule.step()
                step += 1
                display.step(step, schedule.get_last_lr()[0])
                lr = schedule.get_last_lr()[0]
                train_log.step(step, lr, epoch + micro_done / micro_per_epoch, last=step >= total_steps)
                if interrupt_at_step is not None and step == interrupt_at_step:
                    raise _Interrupt(f"interrupted at step {step}")
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    checkpoint_now()
                if step >= total_steps:
                    break
            epoch, micro_done = epoch + 1, 0
            finished = epoch >= t.epochs or step >= total_steps
            if val is not None and not finished and t.eval_every and epoch % t.eval_every == 0 and info.is_main:
                validate(epoch)  # the final evaluation happens once, below
            checkpoint_now()

    result: dict[str, Any] = {"params": counts, "steps": step, "train_seconds": round(time.perf_counter() - start, 2)}
    if not info.is_main:  # evaluation and files are rank 0's
        return result
    if val is not None:
        result["val"] = validate(epoch)
    if test is not None:
        result["test"] = evaluate(method, test, cfg)
        tracker.log({"test": result["test"]}, step)
    tracker.close()
    bad = pairs.bad_samples
    if bad:
        result["bad_samples"] = bad.as_dict()
    write_json(run_dir / "metrics.json", result)
    return result
