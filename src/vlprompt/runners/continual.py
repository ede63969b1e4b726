"""The continual runner: a task sequence, trained one task at a time, evaluated on everything seen so far.

Two layers:

* **Generic** (reused for class-incremental classification): :func:`run_task_sequence` drives any
  :class:`TaskLearner` (``train_task(t)``, ``evaluate(session) -> SessionResult``, ``state_dict()``,
  ``load_state_dict(state, session)``), records the accuracy matrices ``R[metric][i][j]`` (task ``j`` after session
  ``i``), summarises them with :mod:`vlprompt.eval.continual`, writes ``continual.json`` and ``report.html`` after
  every task, and checkpoints the learner between tasks: a killed run restarts at the task it was in.
* **Retrieval**: :class:`RetrievalLearner` trains a method on task ``t``'s pairs only (fresh optimizer and
  schedule per task, no replay), fits routing keys if the method routes, and evaluates on the union of the
  ``continual.eval_split`` sets of tasks ``0..t`` (cross-task distractors included). :func:`run_continual` is
  ``vlprompt continual CONFIG``.

Run directory: ``config.yaml``, ``env.json``, ``continual.json``, ``report.html`` and
``checkpoints/task_XXX/{state.safetensors, loop.json, loop.safetensors}`` (the learner's tensors; the session and RNG
states, see :func:`vlprompt.core.checkpoint.save_loop_state`) with ``checkpoints/latest`` naming the newest
complete one.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader

from vlprompt.config import Config
from vlprompt.core.checkpoint import load_loop_state, rng_state, save_loop_state, set_rng_state
from vlprompt.core.evaluate import autocast_context
from vlprompt.core.factory import build_model, resolve_device, seed_everything, visual_spec
from vlprompt.core.progress import TrainProgress
from vlprompt.core.rundir import atomic_write_text, prepare_run_dir, run_dir_for, tracked_run, write_json
from vlprompt.core.tracking import Tracker, log_session, open_tracker
from vlprompt.core.trainer import epoch_order, make_optimizer, make_schedule, optimizer_step
from vlprompt.data import collate_skip_none
from vlprompt.data.continual import (
    COCO_TASK_POSITIVES,
    TaskSpec,
    read_task_similarity,
    resolve_task_sequence,
    task_filter,
    task_relation,
)
from vlprompt.data.karpathy import GalleryImages, ImageTextPairs, read_annotations
from vlprompt.data.sources import data_path, split_files
from vlprompt.errors import ConfigError
from vlprompt.eval.continual import DEFINITIONS, summarize_matrices
from vlprompt.eval.retrieval import ranks_from_features, retrieval_metrics
from vlprompt.methods import Method, option_names
from vlprompt.methods.continual import ContinualMethod
from vlprompt.reports.pages import heatmap, html_table, write_report
from vlprompt.run_layout import has_loop_state

RESULTS = "continual.json"
REPORT = "report.html"
STATE = "state.safetensors"
RETRIEVAL_KEYS = ("i2t/R@1", "i2t/R@5", "i2t/R@10", "t2i/R@1", "t2i/R@5", "t2i/R@10")


# ==== generic part ================================================================================================
@dataclass
class SessionResult:
    """What one evaluation after session ``i`` produced.

    ``per_task[j]`` holds task ``j``'s metrics (``j = 0..i``; these fill the accuracy matrices), ``overall`` the
    metrics over everything seen (e.g. the whole union gallery), ``info`` anything else worth recording.
    """

    per_task: list[dict[str, float]]
    overall: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class TaskLearner(Protocol):
    """What :func:`run_task_sequence` needs: train one task, evaluate the seen tasks, save and restore state."""

    def train_task(self, task: int) -> dict[str, Any]:
        """Train on task ``task`` only; return facts to record (steps, seconds, losses)."""
        ...

    def evaluate(self, session: int) -> SessionResult:
        """Evaluate tasks ``0..session`` after training task ``session``."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor that must survive to the next task (trained weights, routing keys)."""
        ...

    def load_state_dict(self, state: dict[str, Tensor], session: int) -> None:
        """Restore what :meth:`state_dict` returned after session ``session``."""
        ...


class _Interrupt(Exception):
    """Raised by tests to simulate a kill right after a task's checkpoint."""


def task_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete between-task checkpoint, if any."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if has_loop_state(path) and (path / STATE).exists() else None


def _save_task_checkpoint(run_dir: Path, session: int, state: dict[str, Tensor]) -> Path:
    root = run_dir / "checkpoints"
    final, tmp = root / f"task_{session:03d}", root / f".tmp_task_{session:03d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / STATE))
    save_loop_state(tmp, {"session": session, "rng": rng_state()})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _point_latest(run_dir: Path, final: Path) -> None:
    root = run_dir / "checkpoints"
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("task_*")):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def build_results(tasks: Sequence[dict[str, Any]], sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """``continual.json``: tasks, sessions, accuracy matrices (rows = sessions, columns = tasks, null = not yet
    seen), their summaries (``cl/<metric>/<measure>``) and the definitions of the measures."""
    n_tasks = len(tasks)
    metrics = list(dict.fromkeys(k for s in sessions for row in s["per_task"] for k in row))
    matrices = {
        m: [[s["per_task"][j].get(m) if j < len(s["per_task"]) else None for j in range(n_tasks)] for s in sessions]
        for m in metrics
    }
    complete = {m: rows for m, rows in matrices.items() if all(r[j] is not None for i, r in enumerate(rows)
                                                                for j in range(i + 1))}  # fmt: skip
    summary = {k: _finite_or_none(v) for k, v in summarize_matrices(complete).items()} if sessions else {}
    return {
        "tasks": list(tasks),
        "sessions": sessions,
        "matrices": matrices,
        "summary": summary,
        "definitions": {"R[i][j]": "metric of task j after training session i (tasks 0..i seen)", **DEFINITIONS},
        "complete": len(sessions) == n_tasks,
    }


def write_continual_report(path: Path, results: dict[str, Any], metrics: Sequence[str], title: str) -> Path:
    """``report.html``: a heatmap per metric of ``metrics`` present in the results and the summary table."""
    names = [t["name"] for t in results["tasks"]]
    sections = []
    for m in metrics:
        if m in results["matrices"]:
            rows = [[math.nan if v is None else v for v in row] for row in results["matrices"][m]]
            labels = [f"after {names[i]}" for i in range(len(rows))]
            sections.append((m, heatmap(rows, labels, names, f"{title}: {m}")))
    measures = list(DEFINITIONS)
    table = []
    for m in results["matrices"]:
        row = {"metric": m}
        for measure in measures:
            value = results["summary"].get(f"cl/{m}/{measure}")
            row[measure] = value if value is not None else "-"
        table.append(row)
    sections.append(("summary", html_table(table, ["metric", *measures])))
    return write_report(path, title, sections)


def run_task_sequence(
    learner: TaskLearner,
    tasks: Sequence[dict[str, Any]],
    run_dir: Path,
    resume: bool = False,
    report_metrics: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    interrupt_after_task: int | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train and evaluate ``tasks`` in order with checkpoints between tasks; returns the ``continual.json`` dict.

    ``tasks`` are JSON-able descriptions (at least ``{"name": ...}``). With ``resume`` a run restarts after its last
    completed task (RNG state included, so it ends as an uninterrupted run would); without it an existing
    checkpoint is an error.
    """
    log = log or (lambda message: None)
    results_path = run_dir / RESULTS
    sessions: list[dict[str, Any]] = []
    start = 0
    checkpoint = task_checkpoint(run_dir)
    if checkpoint is not None:
        if not resume:
            raise ConfigError(
                f"{run_dir} already holds a run; pass resume=true to continue it or use another run_name"
            )
        loop = load_loop_state(checkpoint)  # JSON + safetensors; an older version's pickle is refused
        done = int(loop["session"])
        learner.load_state_dict(load_file(str(checkpoint / STATE)), done)
        set_rng_state(loop["rng"])
        sessions = json.loads(results_path.read_text())["sessions"][: done + 1]
        if len(sessions) != done + 1:
            raise ConfigError(f"{results_path} lacks the sessions of checkpoint {checkpoint.name}")
        start = done + 1
        log(f"resuming after task {done} ({tasks[done]['name']})")
    results = build_results(tasks, sessions)
    for t in range(start, len(tasks)):
        began = time.perf_counter()
        info = learner.train_task(t)
        evaluated = learner.evaluate(t)
        sessions.append(
            {
                "session": t,
                "task": tasks[t]["name"],
                "per_task": evaluated.per_task,
                "overall": evaluated.overall,
                "info": {**info, **evaluated.info, "seconds": round(time.perf_counter() - began, 2)},
            }
        )
        results = build_results(tasks, sessions)
        final = _save_task_checkpoint(run_dir, t, learner.state_dict())
        write_json(results_path, results)
        _point_latest(run_dir, final)  # last: a kill before this line resumes from the previous task
        if tracker is not None:
            log_session(tracker, results, t)
        if report_metrics:
            write_continual_report(run_dir / REPORT, results, report_metrics, run_dir.name)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in evaluated.overall.items() if k in report_metrics)
        log(f"task {t} ({tasks[t]['name']}) done: {shown}")
        if interrupt_after_task is not None and t == interrupt_after_task:
            raise _Interrupt(f"interrupted after task {t}")
    return results


# ==== retrieval =====================================================================================================
def method_state(method: Method) -> dict[str, Tensor]:
    """Everything of a method that is not the frozen backbone: all tasks' prompts, routing keys, trained weights."""
    trained = {n for n, p in method.named_parameters() if p.requires_grad}
    # the frozen backbone under any name: a grounding method's detector holds the same towers as detector.backbone
    frozen = {id(t) for t in method.backbone.state_dict(keep_vars=True).values()}
    return {k: v.detach() for k, v in method.state_dict(keep_vars=True).items()
            if k in trained or (not k.startswith("backbone.") and id(v) not in frozen)}  # fmt: skip


def load_method_state(method: Method, state: dict[str, Tensor]) -> None:
    """Load what :func:`method_state` returned (a between-task checkpoint); a mismatch is a clear error."""
    expected = set(method_state(method))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ConfigError(f"task checkpoint does not match the method: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    method.load_state_dict(state, strict=False)


def epoch_cosine(epoch: int, epochs: int) -> float:
    """LR factor ``0.5 (1 + cos(pi e / E))`` of epoch ``e``: LPI's lr_e = 0.025 (1 + cos(pi e / 10)) at lr 0.05."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def task_optimizer(
    cfg: Config, method: Method, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """A task's optimizer (fresh for every task, over the parameters it trains), its schedule
    (``continual.lr_per_epoch``: LPI's CosineAnnealingLR(T_max=epochs) stepped once per epoch; else the trainer's
    per-step schedule) and the fp16 loss scaler, for every continual learner."""
    optimizer = make_optimizer(cfg, method)
    if cfg.continual.lr_per_epoch:
        epochs = cfg.train.epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: epoch_cosine(e, epochs))
    else:
        schedule = make_schedule(cfg, optimizer, total_steps)
    return optimizer, schedule, torch.amp.GradScaler(device.type, enabled=cfg.train.autocast == "fp16")


class RetrievalLearner:
    """Continual image-text retrieval with any method (a :class:`ContinualMethod` gets the task hooks)."""

    def __init__(self, cfg: Config, method: Method, tasks: list[TaskSpec], progress: bool = False) -> None:
        self.cfg, self.method, self.tasks, self.progress = cfg, method, tasks, progress
        self.spec = visual_spec(method.backbone)
        self.device = method.backbone.device
        self.key = cfg.continual.category_key
        split = cfg.continual.eval_split
        if split not in ("val", "test"):
            raise ConfigError(f"continual.eval_split must be val or test, got {split!r}")
        if not getattr(cfg.data, split):
            raise ConfigError(f"data.{split} is empty: continual runs evaluate on the {split} files of seen tasks")
        if cfg.continual.eval_gallery not in ("seen", "all"):
            raise ConfigError(f"continual.eval_gallery must be seen or all, got {cfg.continual.eval_gallery!r}")
        self.train_files, self.eval_files = split_files(cfg.data, "train"), split_files(cfg.data, split)
        # first read after task 0 trains: a malformed file must fail before that
        read_annotations(self.eval_files.annotation)

    # ---- training -------------------------------------------------------------------------------
    def train_task(self, task: int) -> dict[str, Any]:
        """Fresh optimizer and schedule, ``train.epochs`` epochs on task ``task``'s pairs, then routing keys."""
        cfg, t, method = self.cfg, self.cfg.train, self.method
        if isinstance(method, ContinualMethod):
            method.begin_task(task)
        keep = task_filter(self.tasks[task], self.key)
        pairs = self.train_files.pairs(self.spec.image_train, cfg.data.strict, keep)
        info: dict[str, Any] = {"train_pairs": len(pairs), "steps": 0}
        start = time.perf_counter()
        if method.trainable_parameters() and t.epochs > 0:
            info.update(self._optimize(task, pairs))
        if getattr(method, "uses_keys", False):
            self._fit_keys(task)
        info["train_seconds"] = round(time.perf_counter() - start, 2)
        return info

    def _optimize(self, task: int, pairs: ImageTextPairs) -> dict[str, Any]:
        cfg, t, method = self.cfg, self.cfg.train, self.method
        steps_per_epoch = len(pairs) // (t.batch_size * t.grad_accum)
        if steps_per_epoch == 0:
            raise ConfigError(f"task {task}: {len(pairs)} pairs give no full step of batch {t.batch_size}")
        total = steps_per_epoch * t.epochs if not t.max_steps else min(t.max_steps, steps_per_epoch * t.epochs)
        optimizer, schedule, scaler = task_optimizer(cfg, method, total, self.device)
        params = method.trainable_parameters()
        step, losses, terms = 0, [], {}
        method.train()
        with TrainProgress(total, enabled=self.progress) as display:
            for epoch in range(t.epochs):
                used = steps_per_epoch * t.grad_accum * t.batch_size
                order = epoch_order(len(pairs), cfg.seed * 1009 + task, epoch)[:used]
                loader = DataLoader(pairs, batch_size=t.batch_size, sampler=order, drop_last=True,
                                    num_workers=cfg.data.num_workers, collate_fn=collate_skip_none)  # fmt: skip
                for micro, batch in enumerate(loader, start=1):
                    if batch is not None:
                        images, captions, _ = batch
                        with autocast_context(self.device, t.autocast):
                            loss = method(images.to(self.device), method.tokenize(captions)) / t.grad_accum
                        scaler.scale(loss).backward()
                        losses.append(loss.item() * t.grad_accum)
                        display.record(losses[-1], len(captions))
                    if micro % t.grad_accum:
                        continue
                    optimizer_step(optimizer, scaler, params, t.grad_clip)
                    if not cfg.continual.lr_per_epoch:
                        schedule.step()
                    step += 1
                    display.step(step, optimizer.param_groups[0]["lr"])
                    if step >= total:
                        break
                if cfg.continual.lr_per_epoch:
                    schedule.step()
                terms = dict(getattr(method, "loss_terms", {}) or {})
                if step >= total:
                    break
        method.eval()
        last = losses[-steps_per_epoch * t.grad_accum :]
        return {"steps": step, "loss": round(sum(last) / max(len(last), 1), 4), "loss_terms": terms}

    @torch.no_grad()
    def _fit_keys(self, task: int) -> None:
        """K-means keys from frozen features of the task's training images (deterministic views) and captions."""
        cfg, method, bs = self.cfg, self.method, self.cfg.train.eval_batch_size
        gallery = self.train_files.gallery(cfg.data.strict, task_filter(self.tasks[task], self.key))
        images = GalleryImages(gallery, self.spec.image_eval, cfg.data.strict)
        loader = DataLoader(images, batch_size=bs, num_workers=cfg.data.num_workers, collate_fn=collate_skip_none)
        with autocast_context(self.device, cfg.train.autocast):
            image_feats = [method.frozen_image_features(b[0].to(self.device)).float().cpu() for b in loader if b]
            caps = gallery.captions
            text_feats = [method.frozen_text_features(caps[i : i + bs]).float().cpu() for i in range(0, len(caps), bs)]
        method.fit_keys(task, torch.cat(image_feats), torch.cat(text_feats))

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, session: int) -> SessionResult:
        """Per-task R@1/5/10 both ways on the union gallery of tasks ``0..session`` (``eval_gallery=all``: of every
        task, so the gallery never grows and unseen tasks are scored too), and routing accuracy."""
        cfg, method, bs = self.cfg, self.method, self.cfg.train.eval_batch_size
        seen = self.tasks if cfg.continual.eval_gallery == "all" else self.tasks[: session + 1]
        gallery = self.eval_files.gallery(cfg.data.strict, task_filter(seen, self.key))
        to_task = {c: t.index for t in seen for c in t.categories}
        image_task = torch.tensor([to_task[r[self.key]] for r in gallery.records])
        text_task = image_task[torch.tensor(gallery.txt2img)]
        oracle = cfg.continual.oracle_task and isinstance(method, ContinualMethod)
        was_training = method.training
        method.eval()
        n_img, n_txt = gallery.num_images, len(gallery.captions)
        img = torch.zeros(n_img, method.backbone.embed_dim)
        img_routed = torch.full((n_img,), -1, dtype=torch.long)
        ok = torch.zeros(n_img, dtype=torch.bool)
        plans = None if isinstance(method, ContinualMethod) else method.plans()
        images = GalleryImages(gallery, self.spec.image_eval, cfg.data.strict)
        loader = DataLoader(images, batch_size=bs, num_workers=cfg.data.num_workers, collate_fn=collate_skip_none)
        with autocast_context(self.device, cfg.train.autocast):
            for batch in loader:
                if batch is None:
                    continue
                x, idx = batch[0].to(self.device), batch[1]
                if plans is not None:
                    feats, routed = method.encode_image(x, plans), None
                else:
                    feats, routed = method.encode_images_eval(x, image_task[idx] if oracle else None)
                img[idx], ok[idx] = feats.float().cpu(), True
                if routed is not None:
                    img_routed[idx] = routed.cpu()
            txt = torch.zeros(n_txt, method.backbone.embed_dim)
            txt_routed = torch.full((n_txt,), -1, dtype=torch.long)
            for i in range(0, n_txt, bs):
                caps = gallery.captions[i : i + bs]
                if plans is not None:
                    feats, routed = method.encode_text(caps, plans), None
                else:
                    feats, routed = method.encode_texts_eval(caps, text_task[i : i + bs] if oracle else None)
                txt[i : i + len(caps)] = feats.float().cpu()
                if routed is not None:
                    txt_routed[i : i + len(caps)] = routed.cpu()
        method.train(was_training)
        return self._metrics(gallery, img, txt, ok, image_task, text_task, img_routed, txt_routed, len(seen))

    def _metrics(self, gallery, img, txt, ok, image_task, text_task, img_routed, txt_routed, n) -> SessionResult:
        txt2img = torch.tensor(gallery.txt2img)
        keep_txt = ok[txt2img]
        if not bool(ok.all()):  # images that failed to decode leave with their captions
            new_index = torch.cumsum(ok.long(), 0) - 1
            img, image_task, img_routed = img[ok], image_task[ok], img_routed[ok]
            txt, text_task, txt_routed = txt[keep_txt], text_task[keep_txt], txt_routed[keep_txt]
            txt2img = new_index[txt2img[keep_txt]]
        img2txt: list[list[int]] = [[] for _ in range(len(img))]
        for t, i in enumerate(txt2img.tolist()):
            img2txt[i].append(t)
        t2i = torch.as_tensor(ranks_from_features(txt, img, txt2img.tolist()))
        i2t = torch.as_tensor(ranks_from_features(img, txt, img2txt))
        routed = bool((img_routed >= 0).any())

        def block(i_mask: Tensor, t_mask: Tensor, task: int | None) -> dict[str, float]:
            m = {**retrieval_metrics(i2t[i_mask].numpy(), "i2t"), **retrieval_metrics(t2i[t_mask].numpy(), "t2i")}
            m = {k: v for k, v in m.items() if "R@" in k}
            if routed:
                want_i = image_task[i_mask] if task is None else torch.full_like(image_task[i_mask], task)
                want_t = text_task[t_mask] if task is None else torch.full_like(text_task[t_mask], task)
                m["route/image_acc"] = 100.0 * float((img_routed[i_mask] == want_i).float().mean())
                m["route/text_acc"] = 100.0 * float((txt_routed[t_mask] == want_t).float().mean())
            return m

        per_task = [block(image_task == j, text_task == j, j) for j in range(n)]
        everything = torch.ones_like(image_task, dtype=torch.bool), torch.ones_like(text_task, dtype=torch.bool)
        overall = block(*everything, None)
        overall["rsum"] = sum(overall[k] for k in RETRIEVAL_KEYS)
        counts = {"gallery_images": int(len(img)), "gallery_captions": int(len(txt))}
        if not bool(ok.all()):
            counts["undecodable_images"] = int((~ok).sum())
        return SessionResult(per_task, overall, counts)

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return method_state(self.method)

    def load_state_dict(self, state: dict[str, Tensor], session: int) -> None:
        load_method_state(self.method, state)
        if isinstance(self.method, ContinualMethod):
            self.method.begin_task(session)


def build_continual_model(cfg: Config, num_tasks: int, device: torch.device) -> Method:
    """The config's method, told the number of tasks when it has a ``num_tasks`` option left at 0."""
    cfg = copy.deepcopy(cfg)
    name = cfg.method.get("name", "")
    if "num_tasks" in option_names(name) and not cfg.method.get("num_tasks"):
        cfg.method = {**cfg.method, "num_tasks": num_tasks}
    return build_model(cfg, device)


def relation_for(cfg: Config, tasks: list[TaskSpec]) -> Tensor:
    """The ``[T, T]`` related-task matrix the config asks for (identity when none)."""
    source = cfg.continual.task_similarity
    if source == "coco":
        return torch.as_tensor(task_relation(tasks, COCO_TASK_POSITIVES))
    if source:
        return torch.as_tensor(read_task_similarity(data_path(cfg.data, source), len(tasks),
                                                    cfg.continual.task_similarity_threshold))  # fmt: skip
    return torch.eye(len(tasks))


@tracked_run
def run_continual(
    cfg: Config,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    interrupt_after_task: int | None = None,
) -> dict[str, Any]:
    """``vlprompt continual``: run the config's task sequence; returns (and writes) the ``continual.json`` dict."""
    if cfg.data.format != "karpathy":
        raise ConfigError(
            f"continual retrieval reads Karpathy/ALBEF files with a category field, not {cfg.data.format!r}"
        )
    if not cfg.data.train:
        raise ConfigError("data.train is empty: continual runs need a training file with a category field")
    run_dir = run_dir_for(cfg)
    if not cfg.resume and task_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it or use another run_name")
    c = cfg.continual
    train_file = split_files(cfg.data, "train").annotation
    tasks = resolve_task_sequence(c.tasks, c.order, cfg.data.root, train_file, c.category_key)
    tasks = tasks[: c.max_tasks] if c.max_tasks else tasks
    prepare_run_dir(cfg, resuming=cfg.resume and task_checkpoint(run_dir) is not None)
    seed_everything(cfg.seed)
    method = build_continual_model(cfg, len(tasks), resolve_device(cfg.device))
    if isinstance(method, ContinualMethod):
        method.set_task_relation(relation_for(cfg, tasks))
    counts = method.parameter_counts()  # task 0 is current: trainable = what one task trains
    learner = RetrievalLearner(cfg, method, tasks, progress)
    described = [{"index": t.index, "name": t.name, "categories": list(t.categories)} for t in tasks]
    tracker = open_tracker(cfg, run_dir)
    results = run_task_sequence(learner, described, run_dir, cfg.resume, ("i2t/R@1", "t2i/R@1"), log,
                                interrupt_after_task, tracker)  # fmt: skip
    tracker.close()
    results["params"] = {"trainable_per_task": counts["trainable"], "total": counts["total"]}
    results["method"] = cfg.method.get("name", "")
    results["seconds"] = round(sum(s["info"].get("seconds", 0.0) for s in results["sessions"]), 2)
    write_json(run_dir / RESULTS, results)
    return results
