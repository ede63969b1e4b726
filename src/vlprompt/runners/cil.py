"""Class-incremental classification runs: ``vlprompt continual CONFIG`` with a class-incremental method.

Reuses the generic continual runner (:func:`vlprompt.runners.continual.run_task_sequence`: accuracy matrices,
between-task checkpoints, resume) with :class:`ClassIncrementalLearner` as its ``TaskLearner``:

* ``train_task(t)``: ``method.begin_task(t)``, ``train.epochs`` epochs on task ``t``'s training images only (fresh
  optimizer and cosine schedule per task, no exemplars), then ``method.end_task(t, ...)`` (statistics, task-identity
  heads, alignment) over the task's images under the evaluation transform;
* ``evaluate(t)``: every test image of tasks ``0..t``, task unknown, argmax over all seen classes. Per task: ``acc``;
  task-routing methods add ``task_acc`` (how often the right task was inferred) and, with ``cil.oracle_eval``,
  ``acc_oracle`` (the true task given).

The class order (a seeded permutation, or a split file) is saved as ``RUN_DIR/class_split.json``; a resumed run must
find the same one. ``continual.json`` gains the class-incremental measures (:mod:`vlprompt.eval.cil`: FAA, CAA, FFM,
CODA's forgetting) under ``cil/<metric>/<measure>``; ``report.html`` shows the accuracy heatmap and both tables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from vlprompt.config import Config
from vlprompt.core.evaluate import autocast_context
from vlprompt.core.factory import resolve_device, seed_everything, visual_spec
from vlprompt.core.progress import TrainProgress
from vlprompt.core.rundir import prepare_run_dir, run_dir_for, tracked_run, write_json
from vlprompt.core.tracking import open_tracker
from vlprompt.core.trainer import epoch_order, make_schedule
from vlprompt.data import collate_skip_none
from vlprompt.data.cil import (
    ClassSplit,
    LabeledImages,
    build_cil_datasets,
    label_space_size,
    make_class_split,
    read_cil_sets,
    read_class_split,
)
from vlprompt.data.classnames import check_template
from vlprompt.errors import ConfigError
from vlprompt.eval.cil import CIL_DEFINITIONS, summarize_cil
from vlprompt.eval.continual import DEFINITIONS
from vlprompt.methods.base import METHODS
from vlprompt.methods.cil import ClassIncrementalMethod
from vlprompt.reports.pages import heatmap, html_table, write_report
from vlprompt.runners.continual import (
    RESULTS,
    SessionResult,
    build_continual_model,
    load_method_state,
    method_state,
    run_task_sequence,
    task_checkpoint,
)

SPLIT_FILE = "class_split.json"
REPORT = "report.html"


def is_class_incremental(cfg: Config) -> bool:
    """True when the config's method is a class-incremental one (``vlprompt continual`` then runs it here)."""
    name = cfg.method.get("name", "")
    return name in METHODS and issubclass(METHODS.get(name), ClassIncrementalMethod)


def resolve_split(cfg: Config, num_classes: int, run_dir: Path) -> ClassSplit:
    """The config's full class split (file or seeded permutation); a resumed run must find the one it saved."""
    c = cfg.cil
    if c.tasks:
        path = Path(c.tasks).expanduser()
        split = read_class_split(path if path.is_absolute() else Path(cfg.data.root) / path, num_classes)
    else:
        seed = cfg.seed if c.order_seed < 0 else c.order_seed
        split = make_class_split(num_classes, c.num_tasks, seed, c.shuffle_classes)
    saved = run_dir / SPLIT_FILE
    if saved.exists() and task_checkpoint(run_dir) is not None:
        if read_class_split(saved, num_classes).tasks != split.tasks:
            raise ConfigError(f"{saved} holds a different class order than this config; use another run_name")
    return split


@torch.no_grad()
def class_text_anchors(method: ClassIncrementalMethod, names: list[str], templates: list[str]) -> Tensor:
    """``[C, E]`` L2-normalised frozen text embeddings of every class, averaged over ``templates``."""
    if not templates:
        raise ConfigError("cil.templates is empty: give at least one prompt template such as 'a photo of a {}.'")
    total = 0
    for template in templates:
        prompts = [check_template(template).replace("{}", n) for n in names]
        feats = torch.cat([method.backbone.encode_text(prompts[i : i + 256], normalize=True)
                           for i in range(0, len(prompts), 256)])  # fmt: skip
        total = total + feats.float()
    return torch.nn.functional.normalize(total / len(templates), dim=-1)


class ClassIncrementalLearner:
    """The ``TaskLearner`` of class-incremental runs (see the module docstring)."""

    def __init__(self, cfg: Config, method: ClassIncrementalMethod, train: LabeledImages, train_eval: LabeledImages,
                 evaluation: LabeledImages, split: ClassSplit, progress: bool = False) -> None:  # fmt: skip
        self.cfg, self.method, self.split, self.progress = cfg, method, split, progress
        self.train_set, self.train_eval_set, self.eval_set = train, train_eval, evaluation
        self.device = method.backbone.device
        self.offsets = split.offsets
        self._queries: dict[int, Tensor] = {}  # id(dataset) -> frozen queries of every sample (eval transform)

    # ---- data -------------------------------------------------------------------------------------
    def _loader(self, dataset: LabeledImages, indices: list[int], batch_size: int) -> DataLoader:
        # A private generator: creating a loader draws a seed from it, never from the global RNG, so a resumed run
        # (which builds loaders at other moments, e.g. the cached queries) consumes the global RNG like a fresh one.
        return DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=self.cfg.data.num_workers,
                          collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(0))  # fmt: skip

    @torch.no_grad()
    def queries(self, dataset: LabeledImages) -> Tensor:
        """Frozen queries ``[N, Dq]`` of every sample of a deterministic-transform dataset (computed once)."""
        if id(dataset) not in self._queries:
            out = torch.zeros(len(dataset), self.method.query_dim)
            loader = self._loader(dataset, list(range(len(dataset))), self.cfg.train.eval_batch_size)
            with autocast_context(self.device, self.cfg.train.autocast):
                for batch in loader:
                    if batch is not None:
                        out[batch[2]] = self.method.query_features(batch[0].to(self.device)).float().cpu()
            self._queries[id(dataset)] = out
        return self._queries[id(dataset)]

    def task_indices(self, dataset: LabeledImages, task: int) -> list[int]:
        return dataset.indices_of(range(self.offsets[task], self.offsets[task + 1]))

    def _batches(self, task: int) -> Callable[[], Iterator[tuple[Tensor, Tensor, Tensor]]]:
        """Batches ``(images, labels, queries)`` of task ``task``'s training images under the eval transform."""

        def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
            queries = self.queries(self.train_eval_set)
            loader = self._loader(self.train_eval_set, self.task_indices(self.train_eval_set, task),
                                  self.cfg.train.eval_batch_size)  # fmt: skip
            with autocast_context(self.device, self.cfg.train.autocast):
                for batch in loader:
                    if batch is not None:
                        images, labels, idx = batch
                        yield images.to(self.device), labels.to(self.device), queries[idx].to(self.device)

        return batches

    # ---- training ---------------------------------------------------------------------------------
    def train_task(self, task: int) -> dict[str, Any]:
        """Train on task ``task``'s images only, then the method's end-of-task stage."""
        method, t = self.method, self.cfg.train
        method.begin_task(task)
        indices = self.task_indices(self.train_set, task)
        info: dict[str, Any] = {"train_images": len(indices), "steps": 0}
        if not indices:
            raise ConfigError(f"task {task} has no training images (classes {list(self.split.tasks[task])[:5]} ...)")
        start = time.perf_counter()
        if method.trainable_parameters() and t.epochs > 0:
            info.update(self._optimize(task, indices))
        method.eval()
        info.update(method.end_task(task, self._batches(task)))
        info["train_seconds"] = round(time.perf_counter() - start, 2)
        return info

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = self.method.trainable_parameters()
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)

    def _optimize(self, task: int, indices: list[int]) -> dict[str, Any]:
        cfg, t, method = self.cfg, self.cfg.train, self.method
        steps_per_epoch = math.ceil(len(indices) / t.batch_size)
        total = steps_per_epoch * t.epochs if not t.max_steps else min(t.max_steps, steps_per_epoch * t.epochs)
        optimizer = self._optimizer()  # fresh for every task, over this task's parameters only
        schedule = make_schedule(cfg, optimizer, total)
        params = method.trainable_parameters()
        cached = self.queries(self.train_set) if cfg.cil.train_transform == "eval" else None
        step, losses, terms = 0, [], {}
        method.train()
        with TrainProgress(total, enabled=self.progress) as display:
            for epoch in range(t.epochs):
                order = [indices[i] for i in epoch_order(len(indices), cfg.seed * 1009 + task, epoch)]
                for batch in self._loader(self.train_set, order, t.batch_size):
                    if batch is None:
                        continue
                    images, labels, idx = batch
                    images, labels = images.to(self.device), labels.to(self.device)
                    query = cached[idx].to(self.device) if cached is not None else method.query_features(images)
                    with autocast_context(self.device, t.autocast):
                        loss, terms = method.training_loss(images, labels, query)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if t.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                    optimizer.step()
                    schedule.step()
                    step += 1
                    losses.append(float(loss.detach()))
                    display.record(losses[-1], len(labels))
                    display.step(step, optimizer.param_groups[0]["lr"])
                    if step >= total:
                        break
                if step >= total:
                    break
        method.eval()
        last = losses[-steps_per_epoch:]
        return {"steps": step, "loss": round(sum(last) / max(len(last), 1), 4),
                "loss_terms": {k: round(v, 4) for k, v in terms.items()}}  # fmt: skip

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, session: int) -> SessionResult:
        """Accuracy per seen task (task unknown, argmax over every seen class), task-identity accuracy, oracle."""
        method, seen = self.method, self.offsets[session + 1]
        method.set_current_task(session)
        method.eval()
        indices = self.eval_set.indices_of(range(seen))
        queries = self.queries(self.eval_set)
        oracle = self.cfg.cil.oracle_eval and method.routes_tasks
        labels_all, pred_all, routed_all, oracle_all = [], [], [], []
        with autocast_context(self.device, self.cfg.train.autocast):
            for batch in self._loader(self.eval_set, indices, self.cfg.train.eval_batch_size):
                if batch is None:
                    continue
                images, labels, idx = batch
                images, q = images.to(self.device), queries[idx].to(self.device)
                logits, routed = method.predict(images, q)
                if logits.shape[1] != seen:
                    raise RuntimeError(f"{method.name} predicted over {logits.shape[1]} classes, {seen} are seen")
                labels_all.append(labels)
                pred_all.append(logits.argmax(dim=-1).cpu())
                if routed is not None:
                    routed_all.append(routed.cpu())
                if oracle:
                    true_tasks = method.class_task[labels.to(self.device)]
                    oracle_all.append(method.predict(images, q, true_tasks)[0].argmax(dim=-1).cpu())
        labels, pred = torch.cat(labels_all), torch.cat(pred_all)
        tasks = method.class_task.cpu()[labels]
        correct = (pred == labels).float()
        routed = torch.cat(routed_all) if routed_all else None
        oracle_correct = (torch.cat(oracle_all) == labels).float() if oracle_all else None
        per_task = []
        for j in range(session + 1):
            mine = tasks == j
            row = {"acc": 100.0 * float(correct[mine].mean()) if mine.any() else math.nan}
            if routed is not None:
                row["task_acc"] = 100.0 * float((routed[mine] == j).float().mean()) if mine.any() else math.nan
            if oracle_correct is not None:
                row["acc_oracle"] = 100.0 * float(oracle_correct[mine].mean()) if mine.any() else math.nan
            per_task.append(row)
        overall = {
            "acc": 100.0 * float(correct.mean()),
            "acc_task_mean": sum(r["acc"] for r in per_task) / len(per_task),
        }
        if routed is not None:
            overall["task_acc"] = 100.0 * float((routed == tasks).float().mean())
        if oracle_correct is not None:
            overall["acc_oracle"] = 100.0 * float(oracle_correct.mean())
        return SessionResult(per_task, overall, {"eval_images": int(len(labels)), "seen_classes": seen})

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return method_state(self.method)

    def load_state_dict(self, state: dict[str, Tensor], session: int) -> None:
        load_method_state(self.method, state)
        self.method.set_current_task(session)


def class_incremental_counts(cfg: Config, device: torch.device | None = None) -> dict[str, Any]:
    """What :func:`run_class_incremental` trains, without the data's images: the method built for the config's
    split as the runner builds it (task count, label space, heads), then each task begun in turn.

    ``trainable`` = what task 0 trains (the runner's ``params.trainable_per_task``), ``trainable_per_task`` = each
    task's count, ``trainable_over_run`` = distinct parameters some task trains, ``total`` includes CLIP.
    """
    split = resolve_split(cfg, label_space_size(cfg.data, cfg.cil), run_dir_for(cfg))
    split = split.truncated(cfg.cil.max_tasks) if cfg.cil.max_tasks else split
    method: ClassIncrementalMethod = build_continual_model(cfg, split.num_tasks, device or torch.device("cpu"))  # type: ignore[assignment]
    # the anchors' values only initialise text heads: zeros have the shapes the runner's class-text anchors have
    method.setup(split.task_sizes, torch.zeros(split.num_classes, method.backbone.embed_dim))
    per_task, trained = [], {}
    for task in range(split.num_tasks):
        method.begin_task(task)
        learned = {id(p): p for p in method.learned_parameters()}
        per_task.append(sum(p.numel() for p in learned.values()))
        trained.update(learned)
    over_run = sum(p.numel() for p in trained.values())
    return {"trainable": per_task[0], "total": method.parameter_counts()["total"], "tasks": split.num_tasks,
            "trainable_per_task": per_task, "trainable_over_run": over_run}  # fmt: skip


def write_cil_report(path: Path, results: dict[str, Any], title: str) -> Path:
    """``report.html``: accuracy (and task-identity) heatmaps, the class-incremental and the generic summaries."""
    names = [t["name"] for t in results["tasks"]]
    sections = []
    for metric in ("acc", "task_acc", "acc_oracle"):
        if metric in results["matrices"]:
            rows = [[math.nan if v is None else v for v in row] for row in results["matrices"][metric]]
            sections.append((metric, heatmap(rows, [f"after {names[i]}" for i in range(len(rows))], names,
                                             f"{title}: {metric} (task x after session)")))  # fmt: skip
    summary = results["summary"]
    cil_rows = [{"metric": m, **{k: summary.get(f"cil/{m}/{k}", "-") for k in CIL_DEFINITIONS}}
                for m in results["matrices"] if f"cil/{m}/faa" in summary]  # fmt: skip
    sections.append(("class-incremental measures", html_table(cil_rows, ["metric", *CIL_DEFINITIONS])))
    generic = [{"metric": m, **{k: summary.get(f"cl/{m}/{k}", "-") for k in DEFINITIONS}} for m in results["matrices"]]
    sections.append(("continual measures", html_table(generic, ["metric", *DEFINITIONS])))
    defs = "".join(f"<li><b>{k}</b>: {v}</li>" for k, v in {**CIL_DEFINITIONS, **DEFINITIONS}.items())
    sections.append(("definitions", f"<ul>{defs}</ul>"))
    return write_report(path, title, sections)


@tracked_run
def run_class_incremental(
    cfg: Config,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    interrupt_after_task: int | None = None,
) -> dict[str, Any]:
    """Run the config's class-incremental sequence; returns (and writes) the ``continual.json`` dict."""
    if not is_class_incremental(cfg):
        raise ConfigError(f"method {cfg.method.get('name')!r} is not a class-incremental method")
    run_dir = run_dir_for(cfg)
    if not cfg.resume and task_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it or use another run_name")
    sets = read_cil_sets(cfg.data, cfg.cil)
    full = resolve_split(cfg, len(sets.classes), run_dir)
    split = full.truncated(cfg.cil.max_tasks) if cfg.cil.max_tasks else full
    prepare_run_dir(cfg, resuming=cfg.resume and task_checkpoint(run_dir) is not None)
    write_json(run_dir / SPLIT_FILE, full.to_json())
    seed_everything(cfg.seed)
    method: ClassIncrementalMethod = build_continual_model(cfg, split.num_tasks, resolve_device(cfg.device))  # type: ignore[assignment]
    spec = visual_spec(method.backbone)
    datasets = build_cil_datasets(sets, cfg.data, cfg.cil, spec.image_train, spec.image_eval).restrict(split)
    names = [datasets.classes.names[c] for c in split.order]
    method.setup(split.task_sizes, class_text_anchors(method, names, list(cfg.cil.templates)))
    counts = method.parameter_counts()  # task 0 is current: trainable = what one task trains
    learner = ClassIncrementalLearner(cfg, method, datasets.train, datasets.train_eval, datasets.eval, split, progress)
    described = [{"index": t, "name": f"T{t + 1}", "classes": [datasets.classes.names[c] for c in cls]}
                 for t, cls in enumerate(split.tasks)]  # fmt: skip
    tracker = open_tracker(cfg, run_dir)
    results = run_task_sequence(learner, described, run_dir, cfg.resume, ("acc",), log, interrupt_after_task, tracker)
    for metric in ("acc", "acc_oracle"):
        rows = results["matrices"].get(metric)
        if rows and results["complete"]:
            results["summary"].update(summarize_cil(rows, f"cil/{metric}"))
    results["definitions"].update(CIL_DEFINITIONS)
    results["params"] = {"trainable_per_task": counts["trainable"], "total": counts["total"]}
    results["method"] = cfg.method.get("name", "")
    results["class_split"] = split.to_json()
    results["seconds"] = round(sum(s["info"].get("seconds", 0.0) for s in results["sessions"]), 2)
    write_json(run_dir / RESULTS, results)
    tracker.log({k: v for k, v in results["summary"].items() if k.startswith("cil/")}, len(results["sessions"]) - 1,
                "session")  # fmt: skip
    tracker.close()
    write_cil_report(run_dir / REPORT, results, run_dir.name)
    return results


def print_cil_summary(results: dict[str, Any], title: str) -> None:
    """The accuracy matrix and the class-incremental measures in the terminal (``vlprompt continual``)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    names = [t["name"] for t in results["tasks"]]
    table = Table(title="accuracy (%): task (column) after training session (row)")
    table.add_column("after")
    for n in names:
        table.add_column(n, justify="right")
    for i, row in enumerate(results["matrices"].get("acc", [])):
        table.add_row(names[i], *("-" if v is None else f"{v:.1f}" for v in row))
    console.print(table)
    summary = results["summary"]
    table = Table(title=title)
    table.add_column("metric")
    for measure in CIL_DEFINITIONS:
        table.add_column(measure, justify="right")
    for metric in ("acc", "acc_oracle"):
        if f"cil/{metric}/faa" in summary:
            cells = [summary.get(f"cil/{metric}/{m}") for m in CIL_DEFINITIONS]
            table.add_row(metric, *("-" if v is None else f"{v:.2f}" for v in cells))
    console.print(table)
    if "cl/task_acc/last" in summary:
        console.print(f"task-identity accuracy after the last task: {summary['cl/task_acc/last']:.1f}%")
    console.print(f"trainable parameters per task: {results['params']['trainable_per_task']:,}")
    for measure, text in CIL_DEFINITIONS.items():
        console.print(f"[dim]{measure}: {escape(text)}[/dim]")
