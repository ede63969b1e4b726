"""Continual referring-expression grounding (LPI's REC benchmark): ``vlprompt continual`` with a grounding method.

``vlprompt continual`` runs here when the config's method is a
:class:`~vlprompt.methods.grounding.GroundingMethod` (:func:`is_grounding`; ``zeroshot_ground``, ``lpi_ground``, ...),
reusing the generic continual runner (:func:`vlprompt.runners.continual.run_task_sequence`: accuracy matrices, their
summaries, heatmaps, between-task checkpoints, resume) with :class:`GroundingLearner` as its ``TaskLearner``:

* ``train_task(t)``: ``method.begin_task(t)``, ``train.epochs`` epochs on task ``t``'s training expressions only
  (fresh optimizer and schedule per task, no replay; spec ``lpi.md`` section 4: AdamW 0.01, wd 0.05, cosine, batch
  16, grad clip 1.0, from the config), then routing keys from the frozen features of task ``t``'s distinct training
  images (methods that route);
* ``evaluate(t)``: every ``continual.eval_split`` expression of tasks ``0..t``, the task unknown (each image routed
  to a task by the method). Per task ``rec/P@1``, ``rec/P@5``, ``rec/P@10`` (:mod:`vlprompt.eval.grounding`:
  MDETR's GIoU >= 0.5 rule), ``route/acc`` (how often the image picked the task), and with
  ``continual.oracle_task`` also ``oracle/P@K`` (the true task's prompts).

Data (``data.format`` ``mdetr-refexp`` or ``refer``, the ``grounding`` config section; :mod:`vlprompt.data.rec`):
the task of an expression is its target's super-category (:mod:`vlprompt.data.grounding`); the per-task id lists
are regenerated and saved as ``RUN_DIR/task_lists/<dataset>_<split>.json``. Training leaves out targets with a side
of at most ``grounding.min_side`` pixels (GLIP's rule, LPI's task lists); evaluation keeps every expression.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vlprompt.backbone.owlvit import load_owlvit
from vlprompt.backbone.world_detector import WORLD_DETECTOR_TAG, load_world_detector
from vlprompt.config import Config
from vlprompt.core.evaluate import autocast_context
from vlprompt.core.factory import resolve_device, seed_everything
from vlprompt.core.progress import TrainProgress
from vlprompt.core.rundir import prepare_run_dir, run_dir_for, tracked_run, write_json
from vlprompt.core.tracking import open_tracker
from vlprompt.core.trainer import epoch_order, optimizer_step
from vlprompt.data import collate_skip_none
from vlprompt.data.continual import TaskSpec, resolve_task_sequence
from vlprompt.data.grounding import RefSample, save_task_lists
from vlprompt.data.rec import REC_FORMATS, RecDataset, distinct_images, read_rec_split
from vlprompt.errors import ConfigError, DataError
from vlprompt.eval.grounding import DEFAULT_KS, precision_at_k, precision_per_task
from vlprompt.methods import option_names
from vlprompt.methods.base import METHODS
from vlprompt.methods.build import method_options
from vlprompt.methods.continual import ContinualMethod
from vlprompt.methods.grounding import GroundingMethod, normalized_targets
from vlprompt.runners.continual import (
    RESULTS,
    SessionResult,
    build_continual_model,
    load_method_state,
    method_state,
    relation_for,
    run_task_sequence,
    task_checkpoint,
    task_optimizer,
)

REPORT_METRICS = ("rec/P@1", "rec/P@5", "rec/P@10", "route/acc", "oracle/P@1")
TASK_LISTS = "task_lists"


def is_grounding(cfg: Config) -> bool:
    """True when the config's method is a grounding method (``vlprompt continual`` then runs it here)."""
    name = cfg.method.get("name", "")
    return name in METHODS and issubclass(METHODS.get(name), GroundingMethod)


def build_grounding_model(cfg: Config, num_tasks: int, device: torch.device) -> GroundingMethod:
    """The config's grounding method: on ``backbone.*`` with new heads, on the world's pretrained detector
    (``grounding.detector: world``: heads and towers, :mod:`vlprompt.backbone.world_detector`), or on the OWL-ViT /
    OWLv2 checkpoint ``grounding.detector`` (towers and heads; only the local files or cache are read, a missing one
    is a :class:`~vlprompt.errors.WeightsUnavailableError` saying how to get it)."""
    if not cfg.grounding.detector or cfg.grounding.detector == WORLD_DETECTOR_TAG:
        method = build_continual_model(cfg, num_tasks, device)
        if cfg.grounding.detector:
            load_world_detector(method.detector, WORLD_DETECTOR_TAG, (cfg.backbone.name, cfg.backbone.pretrained))
        return method  # type: ignore[return-value]
    section = dict(cfg.method)
    if "num_tasks" in option_names(section.get("name", "")) and not section.get("num_tasks"):
        section["num_tasks"] = num_tasks
    cls, options = method_options(section)
    detector = load_owlvit(cfg.grounding.detector, device=device)
    method = cls.from_detector(detector, options).to(device)
    method.max_words = cfg.data.max_words
    return method  # type: ignore[return-value]


class GroundingLearner:
    """The ``TaskLearner`` of continual grounding runs (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        method: GroundingMethod,
        tasks: Sequence[TaskSpec],
        train: Sequence[RefSample],
        evaluation: Sequence[RefSample],
        progress: bool = False,
    ) -> None:
        self.cfg, self.method, self.tasks, self.progress = cfg, method, list(tasks), progress
        self.device = method.backbone.device
        if cfg.train.grad_accum != 1:
            raise ConfigError("continual grounding steps once per batch: set train.grad_accum=1")
        spec = method.backbone
        self._inputs = (method.detector.image_size, spec.image_mean, spec.image_std, cfg.data.strict)
        side = cfg.grounding.min_side
        self.train_samples = [s for s in train if s.bbox[2] > side and s.bbox[3] > side]
        self.eval_samples = list(evaluation)
        for name, samples in (("training", self.train_samples), (f"{cfg.continual.eval_split}", self.eval_samples)):
            counts = [sum(s.task == t.index for s in samples) for t in self.tasks]
            empty = [t.name for t, n in zip(self.tasks, counts, strict=True) if n == 0]
            if empty:
                raise ConfigError(f"task(s) {empty} have no {name} expressions; drop them with continual.order or "
                                  "continual.max_tasks")  # fmt: skip
        self.bad_images = 0

    # ---- data -------------------------------------------------------------------------------------------------
    def _dataset(self, samples: Sequence[RefSample], source: str) -> RecDataset:
        return RecDataset(samples, *self._inputs[:3], strict=self._inputs[3], source=source)

    def _loader(self, dataset: RecDataset, batch_size: int, order: list[int] | None = None) -> DataLoader:
        # A private generator: making a loader draws a seed from it, never from the global RNG, so a resumed run
        # consumes the global RNG as an uninterrupted one does.
        return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=self.cfg.data.num_workers,
                          collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(0))  # fmt: skip

    def _task_samples(self, samples: Sequence[RefSample], tasks: Sequence[int]) -> list[RefSample]:
        wanted = set(tasks)
        return [s for s in samples if s.task in wanted]

    # ---- training ---------------------------------------------------------------------------------------------
    def train_task(self, task: int) -> dict[str, Any]:
        """Train on task ``task``'s expressions only, then fit its routing keys."""
        method, t = self.method, self.cfg.train
        if isinstance(method, ContinualMethod):
            method.begin_task(task)
        samples = self._task_samples(self.train_samples, [task])
        data = self._dataset(samples, f"task {task} training expressions")
        info: dict[str, Any] = {"train_expressions": len(data), "steps": 0}
        start = time.perf_counter()
        if method.trainable_parameters() and t.epochs > 0:
            info.update(self._optimize(task, data))
        if getattr(method, "uses_keys", False):
            self._fit_keys(task, samples)
        info["train_seconds"] = round(time.perf_counter() - start, 2)
        self.bad_images += data.bad_samples.total
        return info

    def _optimize(self, task: int, data: RecDataset) -> dict[str, Any]:
        cfg, t, method = self.cfg, self.cfg.train, self.method
        steps_per_epoch = math.ceil(len(data) / t.batch_size)
        total = steps_per_epoch * t.epochs if not t.max_steps else min(t.max_steps, steps_per_epoch * t.epochs)
        optimizer, schedule, scaler = task_optimizer(cfg, method, total, self.device)
        params = method.trainable_parameters()
        step, losses, terms = 0, [], {}
        method.train()
        with TrainProgress(total, enabled=self.progress) as display:
            for epoch in range(t.epochs):
                order = epoch_order(len(data), cfg.seed * 1009 + task, epoch)
                for batch in self._loader(data, t.batch_size, order):
                    if batch is None:  # every image of the batch failed to decode
                        continue
                    images, expressions, boxes, sizes = batch[:4]
                    targets = normalized_targets(boxes, sizes).to(self.device)
                    with autocast_context(self.device, t.autocast):
                        loss = method(images.to(self.device), method.tokenize(list(expressions)), targets)
                    scaler.scale(loss).backward()
                    optimizer_step(optimizer, scaler, params, t.grad_clip)
                    if not cfg.continual.lr_per_epoch:
                        schedule.step()
                    step += 1
                    losses.append(float(loss.detach()))
                    terms = dict(getattr(method, "loss_terms", {}) or {})
                    display.record(losses[-1], len(expressions))
                    display.step(step, optimizer.param_groups[0]["lr"])
                    if step >= total:
                        break
                if cfg.continual.lr_per_epoch:
                    schedule.step()
                if step >= total:
                    break
        method.eval()
        last = losses[-steps_per_epoch:]
        return {"steps": step, "loss": round(sum(last) / max(len(last), 1), 4),
                "loss_terms": {k: round(float(v), 4) for k, v in terms.items()}}  # fmt: skip

    @torch.no_grad()
    def _fit_keys(self, task: int, samples: Sequence[RefSample]) -> None:
        """K-means keys from the frozen features of the task's distinct training images (the detector's input)."""
        data = self._dataset(distinct_images(samples), f"task {task} training images")
        feats = []
        with autocast_context(self.device, self.cfg.train.autocast):
            for batch in self._loader(data, self.cfg.train.eval_batch_size):
                if batch is not None:
                    feats.append(self.method.frozen_image_features(batch[0].to(self.device)).float().cpu())
        if not feats:
            raise DataError(f"task {task}: no training image could be read to fit its routing keys")
        self.method.fit_keys(task, torch.cat(feats))

    # ---- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, session: int) -> SessionResult:
        """P@1/5/10 per seen task with routed tasks (and the oracle's), routing accuracy."""
        method, k = self.method, max(DEFAULT_KS)
        routes = isinstance(method, ContinualMethod)
        if routes:
            method.begin_task(session)  # routing chooses among tasks 0..session
        oracle = self.cfg.continual.oracle_task and routes
        data = self._dataset(self._task_samples(self.eval_samples, range(session + 1)), "evaluation expressions")
        was_training = method.training
        method.eval()
        boxes, gt, tasks, routed, oracle_boxes = [], [], [], [], []
        with autocast_context(self.device, self.cfg.train.autocast):
            for batch in self._loader(data, self.cfg.train.eval_batch_size):
                if batch is None:
                    continue
                images, expressions, target, sizes, true_task = batch[:5]
                images = images.to(self.device)
                pred = method.predict(images, list(expressions), sizes.to(self.device), k)
                boxes.append(pred.boxes.float().cpu())
                gt.append(target)
                tasks.append(true_task)
                if pred.tasks is not None:
                    routed.append(pred.tasks.cpu())
                if oracle:
                    told = method.predict(images, list(expressions), sizes.to(self.device), k, tasks=true_task)
                    oracle_boxes.append(told.boxes.float().cpu())
        method.train(was_training)
        if not tasks:
            raise DataError("no evaluation image could be read")
        self.bad_images += data.bad_samples.total
        result = session_metrics(session, torch.cat(boxes), torch.cat(gt), torch.cat(tasks),
                                 torch.cat(routed) if routed else None,
                                 torch.cat(oracle_boxes) if oracle_boxes else None)  # fmt: skip
        scored = sum(len(t) for t in tasks)
        result.info["eval_expressions"] = scored
        if scored < len(data):  # expressions whose image failed to decode are left out of every number
            result.info["undecodable_images"] = len(data) - scored
        return result

    # ---- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return method_state(self.method)

    def load_state_dict(self, state: dict[str, Tensor], session: int) -> None:
        load_method_state(self.method, state)
        if isinstance(self.method, ContinualMethod):
            self.method.begin_task(session)


def session_metrics(session: int, boxes: Tensor, gt: Tensor, tasks: Tensor, routed: Tensor | None = None,
                    oracle: Tensor | None = None) -> SessionResult:  # fmt: skip
    """One evaluation's :class:`SessionResult`: per seen task ``0..session`` and over all, P@1/5/10 of the top-k
    pixel ``boxes [N, k, 4]`` for targets ``gt [N, 4]`` of true ``tasks [N]``; ``route/acc`` from the ``routed``
    tasks; ``oracle/P@K`` from the boxes predicted with the true task."""
    per = precision_per_task(boxes, gt, tasks)
    told = precision_per_task(oracle, gt, tasks, prefix="oracle") if oracle is not None else {}
    per_task = []
    for j in range(session + 1):
        row = dict(per.get(j, {}))  # a task whose every image failed to decode has no numbers
        if routed is not None and bool((tasks == j).any()):
            row["route/acc"] = 100.0 * float((routed[tasks == j] == j).float().mean())
        row.update(told.get(j, {}))
        per_task.append(row)
    overall = precision_at_k(boxes, gt)
    if routed is not None:
        overall["route/acc"] = 100.0 * float((routed == tasks).float().mean())
    if oracle is not None:
        overall.update(precision_at_k(oracle, gt, prefix="oracle"))
    return SessionResult(per_task, overall)


def grounding_tasks(cfg: Config) -> tuple[list[TaskSpec], list[TaskSpec]]:
    """``(the run's tasks, the sequence the files are read with)``: ``continual.tasks`` (default ``coco``) re-ordered
    or subset by ``continual.order`` and cut by ``continual.max_tasks``; the reading sequence appends the left-out
    super-categories after them, so their expressions are read (and then skipped) rather than refused."""
    c = cfg.continual
    source = c.tasks or "coco"
    full = resolve_task_sequence(source, [], cfg.data.root, None, c.category_key)
    tasks = resolve_task_sequence(source, c.order, cfg.data.root, None, c.category_key)
    tasks = tasks[: c.max_tasks] if c.max_tasks else tasks
    used = {t.name for t in tasks}
    rest = [t for t in full if t.name not in used]
    reading = list(tasks) + [TaskSpec(len(tasks) + i, t.name, t.categories) for i, t in enumerate(rest)]
    return list(tasks), reading


def _in_run(samples: list[RefSample], n: int) -> list[RefSample]:
    return [s for s in samples if s.task < n]


@tracked_run
def run_continual_grounding(
    cfg: Config,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    interrupt_after_task: int | None = None,
) -> dict[str, Any]:
    """Run the config's continual grounding sequence; returns (and writes) the ``continual.json`` dict."""
    if not is_grounding(cfg):
        raise ConfigError(f"method {cfg.method.get('name')!r} is not a grounding method")
    if cfg.data.format not in REC_FORMATS:
        raise ConfigError(f"grounding reads data.format {' or '.join(REC_FORMATS)}, not {cfg.data.format!r}")
    split = cfg.continual.eval_split
    run_dir = run_dir_for(cfg)
    resuming = task_checkpoint(run_dir) is not None
    if resuming and not cfg.resume:
        raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it or use another run_name")
    tasks, reading = grounding_tasks(cfg)
    # every file is read (and any malformed one refused) before the first training step
    train_all = read_rec_split(cfg.data, cfg.grounding, "train", reading)
    eval_all = read_rec_split(cfg.data, cfg.grounding, split, reading)
    prepare_run_dir(cfg, resuming=cfg.resume and resuming)
    lists = {}
    for samples in (train_all, eval_all):
        first = samples[0] if samples else None
        name = f"{first.dataset or 'rec'}_{first.split}.json" if first else "empty.json"
        save_task_lists(samples, run_dir / TASK_LISTS / name, cfg.grounding.min_side, reading)
        lists[first.split if first else name] = f"{TASK_LISTS}/{name}"
    seed_everything(cfg.seed)
    method = build_grounding_model(cfg, len(tasks), resolve_device(cfg.device))
    if isinstance(method, ContinualMethod):
        method.set_task_relation(relation_for(cfg, tasks))
    counts = method.parameter_counts()  # task 0 is current: trainable = what one task trains
    learner = GroundingLearner(cfg, method, tasks, _in_run(train_all, len(tasks)), _in_run(eval_all, len(tasks)),
                               progress)  # fmt: skip
    described = [{"index": t.index, "name": t.name, "categories": list(t.categories)} for t in tasks]
    tracker = open_tracker(cfg, run_dir)
    results = run_task_sequence(learner, described, run_dir, cfg.resume, REPORT_METRICS, log, interrupt_after_task,
                                tracker)  # fmt: skip
    tracker.close()
    results["params"] = {"trainable_per_task": counts["trainable"], "total": counts["total"]}
    results["method"] = cfg.method.get("name", "")
    results["task_lists"] = lists
    results["seconds"] = round(sum(s["info"].get("seconds", 0.0) for s in results["sessions"]), 2)
    if learner.bad_images:
        results["undecodable_images"] = learner.bad_images
    write_json(run_dir / RESULTS, results)
    return results
