"""``vlprompt report RUN_DIR...``: one HTML page over finished runs (train, eval, continual, TTA), seeds aggregated.

Runs whose resolved configs differ only in ``seed`` (and where they were written) form one group, reported as
mean ± std (sample standard deviation, n-1) with the number of seeds. Every run is labelled by the data it was
tested on, taken from its config (``data.root`` and the split's file), never by the file name alone. Pages show:
the runs, metric tables in reading order (R@1, R@5, R@10 per direction) with a chance row, recall@K curves per
direction, validation curves, continual accuracy matrices, test-time adaptation against the 0-step run of the same
data, backbone and direction, the environment (versions, device, git SHA from ``env.json``), the date, and the
definition of every metric shown.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlprompt.config import DataConfig, TTAConfig
from vlprompt.core.rundir import reportable_runs
from vlprompt.errors import ConfigError, DataError
from vlprompt.reports.pages import (
    DIRECTIONS,
    ENV_FIELDS,
    MEAN_STD,
    Html,
    Panel,
    bar_panels,
    chance_recall,
    chance_topk,
    environment_html,
    glossary_html,
    heatmap,
    html_table,
    line_panels,
    mean_std_cell,
    metric_group,
    metric_sort_key,
    now_utc,
    side_by_side,
    write_report,
)

#: Config keys that do not change what a run measures (a group may differ in them).
NOT_DEFINING = ("seed", "out_dir", "run_name", "resume", "device", "log")
#: Numbers of a results file that describe the run (size, time) rather than score it.
FACTS = ("trainable", "samples", "steps", "train_seconds", "seconds_total", "seconds_setup",
         "seconds_adapt_per_sample", "seconds")  # fmt: skip
#: Path parts that name a split rather than a dataset (dropped from data labels).
SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "default"}
#: Metric columns per table: more would need horizontal scrolling at 1200 px.
MAX_METRIC_COLUMNS = 10
#: TTA scores compared with the 0-step baseline.
TTA_SCORES = ("/R@", "/top")
#: Timing keys of a TTA ``metrics.json`` as first written (before issue 15) -> their current names; both are read.
OLD_TIMING_NAMES = {"seconds": "seconds_total", "seconds_per_sample": "seconds_adapt_per_sample"}


@dataclass
class Run:
    """What one run directory holds, flattened for tables and plots."""

    path: Path
    kind: str  # train | eval | continual | tta
    config: dict[str, Any]
    metrics: dict[str, float]  # scores only
    curve: list[dict[str, float]] = field(default_factory=list)  # per-epoch validation (train runs)
    matrices: dict[str, list[list[float | None]]] = field(default_factory=dict)  # continual runs
    tasks: list[str] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)  # trainable parameters, samples, timings
    before: dict[str, float] = field(default_factory=dict)  # TTA: the run's own scores before adapting
    env: dict[str, Any] = field(default_factory=dict)  # env.json
    finished: str = ""  # when the results file was written (UTC)

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "?"))

    @property
    def steps(self) -> int:
        """TTA adaptation steps per sample (0 = the zero-shot baseline)."""
        return int(self.config.get("tta", {}).get("steps", 0) or 0)

    @property
    def tested_on(self) -> str:
        """The test data, named from the config (dataset folder and file, split names dropped)."""
        return data_label(self.config.get("data", {}), "test")

    @property
    def trained_on(self) -> str:
        """The training data (empty for TTA and evaluation runs)."""
        return data_label(self.config.get("data", {}), "train") if self.kind in ("train", "continual") else ""

    @property
    def setting(self) -> str:
        """The method and the options that tell runs of it apart (direction, tuned part, TTA steps)."""
        method = self.config.get("method", {})
        parts = [self.method, *(str(method[k]) for k in ("direction", "tune") if method.get(k))]
        label = " ".join(parts)
        if self.kind == "tta":
            label += f", {self.steps} step{'s' if self.steps != 1 else ''}"
        return label

    def group_key(self) -> str:
        defining = {k: v for k, v in self.config.items() if k not in NOT_DEFINING}
        return json.dumps(defining, sort_keys=True, default=str)


def data_label(data: dict[str, Any], split: str) -> str:
    """``data.<split>`` as a reader would name it: the dataset folder (``data.root``, or the folder of an absolute
    file) and the file's path inside it, without suffix and without parts that only name a split.

    ``root=/data/emoji_mono, test=test.json`` -> ``emoji_mono``; ``root=world, test=retrieval/test_sketch.json``
    -> ``world/retrieval/test_sketch``; ``root=world, test=classification/sketch/test`` ->
    ``world/classification/sketch``.
    """
    value, root = str(data.get(split) or ""), str(data.get("root") or "")
    if not value:  # classification TTA without data.test: the root is the test folder
        return Path(root).name if split == "test" and root else ""
    path = Path(value)
    if path.is_absolute() or not root:
        parts = [path.parent.name, path.stem] if len(path.parts) > 1 else [path.stem]
    else:
        parts = [Path(root).name, *(path.with_suffix("") if path.suffix else path).parts]
    kept = [p for p in parts if p and p not in (".", "..") and p.lower() not in SPLIT_NAMES]
    return "/".join(kept) or "/".join(p for p in parts if p) or "?"


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``d`` (ints stay ints: a parameter count prints as 6,144, not 6,144.0)."""
    return {f"{prefix}{k}": v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _finished(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M")


def tta_facts(data: dict[str, Any]) -> dict[str, float]:
    """Size and timing of a TTA ``metrics.json``, under the current names whichever names the file used."""
    facts = {OLD_TIMING_NAMES.get(k, k): v for k, v in _numbers(data).items() if k in FACTS or k in OLD_TIMING_NAMES}
    if "seconds_setup" not in facts and {"seconds_total", "seconds_adapt_per_sample", "samples"} <= set(facts):
        # older files: the total included the setup, the per-sample time did not
        loop = facts["seconds_adapt_per_sample"] * facts["samples"]
        facts["seconds_setup"] = max(0.0, facts["seconds_total"] - loop)
    return facts


def load_run(path: Path) -> Run:
    """Read a run directory written by ``train``, ``eval --out``, ``continual`` or ``tta``."""
    path = Path(path)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{path} is not a run directory (no config.yaml)")
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True) or {}
    env = _read_json(path / "env.json")
    if (path / "continual.json").is_file():
        data = json.loads((path / "continual.json").read_text())
        summary = {k: v for k, v in data.get("summary", {}).items() if isinstance(v, int | float)}
        tasks = [t.get("name", str(i)) for i, t in enumerate(data.get("tasks", []))]
        params = data.get("params", {})
        facts = _numbers({"trainable": params.get("trainable_per_task"), "seconds_total": data.get("seconds")})
        return Run(path, "continual", config, _numbers(summary), matrices=data.get("matrices", {}), tasks=tasks,
                   facts=facts, env=env, finished=_finished(path / "continual.json"))  # fmt: skip
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise ConfigError(f"{path} has no results yet (no metrics.json or continual.json): did the run finish?")
    data = json.loads(metrics_file.read_text())
    finished = _finished(metrics_file)
    if "test" in data or "val" in data:
        metrics = {**_numbers(data.get("val", {}), "val/"), **_numbers(data.get("test", {}))}
        facts = _numbers({"trainable": data.get("params", {}).get("trainable"), "steps": data.get("steps"),
                          "train_seconds": data.get("train_seconds")})  # fmt: skip
        curve_file = path / "metrics.jsonl"
        curve = [json.loads(line) for line in curve_file.read_text().splitlines()] if curve_file.is_file() else []
        kind = "eval" if "evaluated" in data else "train"  # `vlprompt eval --out` marks what it evaluated
        return Run(path, kind, config, metrics, curve=curve, facts=facts, env=env, finished=finished)
    scores = {k: v for k, v in _numbers(data).items() if k not in FACTS and k not in OLD_TIMING_NAMES}
    before = _numbers(data.get("before_adaptation") or {})
    return Run(path, "tta", config, scores, facts=tta_facts(data), before=before, env=env, finished=finished)


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped by everything but the seed, in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    return list(groups.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_label(group: Sequence[Run]) -> str:
    names = sorted({r.path.name for r in group})
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"


def _cell(values: Sequence[float], decimals: int = 2) -> Any:
    """One table cell over seeds: the value (also when every seed has the same one), or the mean with its ± std
    below; counts stay integers."""
    if len(set(values)) == 1:
        v = values[0]
        return v if isinstance(v, int) else mean_std_cell(v, None, decimals)
    return mean_std_cell(*mean_std(values), decimals)


# ---- chance levels ---------------------------------------------------------------------------------------
_chance_cache: dict[str, dict[str, float]] = {}


def chance_levels(config: Any, classification: bool = False) -> dict[str, float]:
    """Chance level of the R@K, top-k and order metrics on a config's test split ({} if its files are unreadable).

    Retrieval: every caption has one correct item among the gallery's items, every item its own captions among
    all captions (:func:`~vlprompt.reports.pages.chance_recall`). ``classification``: a TTA classification run,
    ``k / number of classes``.
    """
    try:  # a config written by an older version may lack newer keys: their defaults fill in
        plain = config if isinstance(config, dict) else OmegaConf.to_container(OmegaConf.structured(config))
        data = OmegaConf.merge(OmegaConf.structured(DataConfig), plain.get("data") or {})
        tta = OmegaConf.merge(OmegaConf.structured(TTAConfig), plain.get("tta") or {})
        cfg = OmegaConf.create({"data": data, "tta": tta})
    except (ValueError, TypeError, AttributeError, OmegaConfBaseException):
        return {}
    key = json.dumps([OmegaConf.to_container(data), classification and tta.classes], sort_keys=True, default=str)
    if key in _chance_cache:
        return _chance_cache[key]
    levels: dict[str, float] = {}
    try:
        if classification:
            from vlprompt.data.sources import classification_set

            n = len(classification_set(cfg.data, cfg.tta.classes).classes.names)
            levels = {f"cls/top{k}": chance_topk(k, n) for k in (1, 5)}
        else:
            from vlprompt.data.sources import VisualSpec, eval_set

            gallery = eval_set(cfg.data, "test", VisualSpec(None, None, 224, (0.0,) * 3, (1.0,) * 3))
            if gallery is not None and gallery.captions:
                t2v, v2t = gallery.names
                per_item = Counter(gallery.txt2vis)
                for k in (1, 5, 10, 50):
                    levels[f"{t2v}/R@{k}"] = chance_recall(k, gallery.num_visual, [1] * len(gallery.captions))
                    levels[f"{v2t}/R@{k}"] = chance_recall(k, len(gallery.captions), per_item.values())
                if gallery.order_pairs:
                    levels[f"{t2v}/order_acc"] = 50.0  # a pair is one of two orders
    except (ConfigError, DataError, OSError, ValueError, KeyError, TypeError, AttributeError):
        levels = {}  # the data is not where the config says (e.g. another machine): no chance level to show
    _chance_cache[key] = levels
    return levels


def run_chance(run: Run) -> dict[str, float]:
    """Chance levels of ``run``'s test metrics (none for continual runs: their gallery grows task by task)."""
    if run.kind == "continual":
        return {}
    return chance_levels(run.config, classification=run.kind == "tta" and run.method != "rlcf_retrieval")


# ---- tables ----------------------------------------------------------------------------------------------
def _group_title(group: str) -> str:
    parts = group.split("/")
    named = [f"{DIRECTIONS[p]} ({p})" if p in DIRECTIONS else p for p in parts]
    title = " ".join(named)
    title = title.replace("val ", "validation: ", 1) if parts[0] == "val" else title
    return title.replace("cl ", "continual: ", 1) if parts[0] == "cl" else title or "both directions"


def runs_table(groups: Sequence[Sequence[Run]]) -> str:
    """What each group is: kind, method, data, seeds, size and time, when it finished."""
    rows = []
    for g in groups:
        r = g[0]
        row: dict[str, Any] = {"run": group_label(g), "kind": r.kind, "method": r.setting, "tested on": r.tested_on,
                               "trained on": r.trained_on or "–", "seeds": len(g)}  # fmt: skip
        for fact, column in (("trainable", "trainable"), ("seconds_total", "time (s)"), ("train_seconds", "time (s)")):
            values = [x.facts[fact] for x in g if fact in x.facts]
            if values and column not in row:
                row[column] = _cell(values, decimals=1)
        row["finished (UTC)"] = Html(f"<span class='nowrap'>{max(x.finished for x in g)}</span>")
        rows.append(row)
    columns = ["run", "kind", "method", "tested on", "trained on", "seeds", "trainable", "time (s)", "finished (UTC)"]
    return html_table(rows, columns)


def metric_tables(groups: Sequence[Sequence[Run]]) -> list[str]:
    """Every score of ``groups`` (runs of one kind), in reading order, split into tables that fit the page.

    Columns sit under their direction (``text → image (t2i)``: R@1, R@5, R@10, MdR, MnR); a ``chance`` row per
    tested data shows what a random ranking scores. Groups scored on different things (image -> text TTA runs and
    classification runs) get tables of their own rather than columns of dashes.
    """
    by_scores: dict[tuple[str, ...], list[Sequence[Run]]] = {}
    for g in groups:
        directions = {metric_group(k) for r in g for k in r.metrics} - {""}  # rsum and val/ are extras
        by_scores.setdefault(tuple(sorted(d for d in directions if not d.startswith("val/"))), []).append(g)
    return [table for part in by_scores.values() for table in _metric_tables(part)]


def _metric_tables(groups: Sequence[Sequence[Run]]) -> list[str]:
    keys = sorted({k for g in groups for r in g for k in r.metrics}, key=metric_sort_key)
    spans: list[tuple[str, list[str]]] = []
    for k in keys:
        if spans and spans[-1][0] == metric_group(k):
            spans[-1][1].append(k)
        else:
            spans.append((metric_group(k), [k]))
    chunks: list[list[tuple[str, list[str]]]] = [[]]
    for span in spans:  # a direction is never split over two tables unless it alone is too wide
        for i in range(0, len(span[1]), MAX_METRIC_COLUMNS):
            part = (span[0], span[1][i : i + MAX_METRIC_COLUMNS])
            if sum(len(c) for _, c in chunks[-1]) + len(part[1]) > MAX_METRIC_COLUMNS:
                chunks.append([])
            chunks[-1].append(part)
    chances: dict[str, dict[str, float]] = {}
    for g in groups:
        chances.setdefault(g[0].tested_on, run_chance(g[0]))
    tables = []
    for chunk in chunks:
        columns = [k for _, ks in chunk for k in ks]
        if not columns:
            continue
        rows = []
        for g in groups:
            row: dict[str, Any] = {"run": group_label(g), "tested on": g[0].tested_on, "seeds": len(g)}
            for k in columns:
                values = [r.metrics[k] for r in g if k in r.metrics]
                row[k] = _cell(values) if values else "–"
            rows.append(row)
        for data, levels in chances.items():
            if any(k in levels for k in columns):
                cells = {k: mean_std_cell(levels[k], None) if k in levels else "" for k in columns}
                rows.append({"run": Html("<i>chance</i>"), "tested on": data, "seeds": "", **cells})
        labels = {k: k.rsplit("/", 1)[-1] for k in columns}
        spans_html = [("", 3), *((_group_title(t), len(ks)) for t, ks in chunk)]
        tables.append(html_table(rows, ["run", "tested on", "seeds", *columns], labels, spans_html))
    return tables


# ---- test-time adaptation --------------------------------------------------------------------------------
def _evaluation_key(run: Run) -> str:
    """What a 0-step run must share with an adapted one to be its baseline: the same samples of the same data,
    the same backbone, task and direction."""
    c = run.config
    tta = c.get("tta", {})
    key = {
        "data": {k: v for k, v in c.get("data", {}).items() if k != "num_workers"},
        "backbone": c.get("backbone"),
        "retrieval": run.method == "rlcf_retrieval",
        "direction": c.get("method", {}).get("direction"),
        "samples": [tta.get("max_samples"), tta.get("shuffle"), tta.get("classes")],
        # the seed picks the samples only when a shuffled subset is taken
        "seed": c.get("seed") if tta.get("max_samples") and tta.get("shuffle") else None,
    }
    return json.dumps(key, sort_keys=True, default=str)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def find_baseline(run: Run, candidates: Sequence[Run]) -> tuple[dict[str, float], str] | None:
    """``run``'s 0-step baseline: a 0-step TTA run on the same samples (the closest config when several), else
    the run's own scores before adapting (recorded by the run, unless momentum moved its start point)."""
    key = _evaluation_key(run)
    same = [c for c in candidates if c is not run and c.steps == 0 and _evaluation_key(c) == key]
    if same:
        mine = _flat(run.config)
        best = min(same, key=lambda c: sum(_flat(c.config).get(k) != v for k, v in mine.items()))
        return best.metrics, best.path.name
    if run.before and not run.config.get("tta", {}).get("momentum"):
        return run.before, "same run, before adapting"
    return None


@dataclass
class TTAEntry:
    """One adapted (or 0-step) group on one score, with its baseline."""

    group: list[Run]
    key: str
    values: list[float]
    baselines: list[float]  # per run with a baseline (may be fewer than values)
    sources: list[str]


def tta_entries(runs: Sequence[Run]) -> list[TTAEntry]:
    """Per TTA group and score (R@K, top-k): its values and each run's 0-step baseline."""
    tta = [r for r in runs if r.kind == "tta"]
    entries = []
    for group in group_runs(tta):
        keys = sorted({k for r in group for k in r.metrics if any(s in k for s in TTA_SCORES)}, key=metric_sort_key)
        for key in keys:
            values, baselines, sources = [], [], []
            for r in group:
                if key not in r.metrics:
                    continue
                values.append(r.metrics[key])
                found = find_baseline(r, tta) if r.steps else None
                if found is not None and key in found[0]:
                    baselines.append(found[0][key])
                    sources.append(found[1])
            entries.append(TTAEntry(group, key, values, baselines, sources))
    return entries


def tta_table(entries: Sequence[TTAEntry]) -> str:
    """Adapted score, 0-step baseline and gain per TTA group and score."""
    rows = []
    for e in entries:
        if not e.group[0].steps:
            continue
        chance = run_chance(e.group[0]).get(e.key)
        row: dict[str, Any] = {"tested on": e.group[0].tested_on, "score": e.key, "method": e.group[0].setting,
                               "seeds": len(e.values), "adapted": _cell(e.values),
                               "chance": "–" if chance is None else mean_std_cell(chance, None)}  # fmt: skip
        if len(e.baselines) == len(e.values):
            gains = [v - b for v, b in zip(e.values, e.baselines, strict=True)]
            row |= {"0 steps": _cell(e.baselines), "gain": _cell(gains), "baseline": ", ".join(sorted(set(e.sources)))}
        else:
            row |= {"0 steps": "–", "gain": "–", "baseline": "none: run the same config with tta.steps=0"}
        rows.append(row)
    if not rows:
        return ""
    columns = ["tested on", "score", "method", "seeds", "chance", "0 steps", "adapted", "gain", "baseline"]
    return html_table(rows, columns)


def tta_timing_table(groups: Sequence[Sequence[Run]]) -> str:
    """Where a TTA run's time goes: once per run (setup), per sample (views, adaptation, prediction), in total."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"run": group_label(g), "method": g[0].setting, "seeds": len(g)}
        for fact, column, scale in (("samples", "samples", 1), ("seconds_setup", "setup (s)", 1.0),
                                    ("seconds_adapt_per_sample", "per sample (ms)", 1000.0),
                                    ("seconds_total", "total (s)", 1.0)):  # fmt: skip
            values = [r.facts[fact] * scale for r in g if fact in r.facts]
            row[column] = _cell(values, decimals=1) if values else "–"
        rows.append(row)
    columns = ["run", "method", "seeds", "samples", "setup (s)", "per sample (ms)", "total (s)"]
    return html_table(rows, columns) if rows else ""


def tta_plot(entries: Sequence[TTAEntry]) -> str:
    """The panels of :func:`tta_panels` as one figure ("" when there is no TTA run)."""
    panels = tta_panels(entries)
    return bar_panels(panels, "test-time adaptation (black mark: the 0-step baseline)") if panels else ""


def tta_panels(entries: Sequence[TTAEntry]) -> list[Panel]:
    """One panel per headline score (top-1, R@1 of each direction): bars per method on each tested data, the
    0-step baseline as a black mark on each bar, chance dashed. Runs of one direction never appear in the other's."""
    headline = [e for e in entries if e.key.endswith(("/R@1", "/top1"))]
    panels = []
    for key in sorted({e.key for e in headline}, key=metric_sort_key):
        mine = [e for e in headline if e.key == key]
        adapted = [e for e in mine if e.group[0].steps] or mine  # only 0-step runs: plot those
        data = list(dict.fromkeys(e.group[0].tested_on for e in adapted))
        series: dict[str, list[float]] = {}
        marks: dict[str, list[float]] = {}
        for e in adapted:
            i = data.index(e.group[0].tested_on)
            name = e.group[0].setting
            if name in series and not math.isnan(series[name][i]):  # two groups of one setting: say which is which
                name = f"{name} ({group_label(e.group)})"
            series.setdefault(name, [math.nan] * len(data))
            marks.setdefault(name, [math.nan] * len(data))
            series[name][i] = statistics.fmean(e.values)
            if e.group[0].steps and len(e.baselines) == len(e.values):
                marks[name][i] = statistics.fmean(e.baselines)
        chance = []
        for d in data:
            run = next(e.group[0] for e in adapted if e.group[0].tested_on == d)
            chance.append(run_chance(run).get(key, math.nan))
        title = f"{DIRECTIONS.get(key.split('/')[0], key.split('/')[0])}: {key}"
        panels.append(Panel(title, data, series, key + " (%)", chance, marks))
    return panels


# ---- curves ----------------------------------------------------------------------------------------------
def recall_curves(groups: Sequence[Sequence[Run]]) -> str | None:
    """Recall@K against K: one panel per direction, one line per group that has that direction (mean over seeds),
    and the chance curve of each tested data."""
    panels = []
    several = len({g[0].tested_on for g in groups}) > 1  # then each line says what it was tested on
    for direction in DIRECTIONS:
        lines = []
        data = {}
        for group in groups:
            ks = [k for k in (1, 5, 10, 50) if all(f"{direction}/R@{k}" in r.metrics for r in group)]
            if len(ks) < 2:
                continue
            means = [mean_std([r.metrics[f"{direction}/R@{k}"] for r in group])[0] for k in ks]
            label = f"{group_label(group)} ({group[0].tested_on})" if several else group_label(group)
            lines.append((label, ks, means, "line"))
            data.setdefault(group[0].tested_on, (group[0], ks))
        for name, (run, ks) in data.items():
            levels = run_chance(run)
            if all(f"{direction}/R@{k}" in levels for k in ks):
                label = "chance" if len(data) == 1 else f"chance ({name})"
                lines.append((label, ks, [levels[f"{direction}/R@{k}"] for k in ks], "chance"))
        panels.append((f"{DIRECTIONS[direction]} ({direction})", "K", lines))
    return line_panels(panels)


def validation_curves(runs: Sequence[Run]) -> str | None:
    """Validation R@1 over epochs of the train runs that evaluated during training, one panel per direction."""
    keys = sorted({k for r in runs for e in r.curve for k in e if k.startswith("val/") and k.endswith("R@1")},
                  key=metric_sort_key)  # fmt: skip
    panels = []
    for key in keys:
        lines = []
        for r in (r for r in runs if any(key in e for e in r.curve)):
            points = [e for e in r.curve if key in e]
            lines.append((r.path.name, [e["epoch"] for e in points], [e[key] for e in points], "line"))
        panels.append((key, "epoch", lines))
    return line_panels(panels)


# ---- the page --------------------------------------------------------------------------------------------
def environments(runs: Sequence[Run]) -> list[tuple[str, dict[str, Any]]]:
    """Distinct environments (all but seed and command line) and which runs ran in each."""
    seen: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for r in runs:
        env = {k: r.env[k] for k in ENV_FIELDS if k in r.env}  # not seed, command line or data locations
        if not env:
            continue
        if not env.get("device"):  # env.json of this version records no device: say what was asked for
            env["device"] = f"{r.config.get('device', '?')} (as configured)"
        seen.setdefault(json.dumps(env, sort_keys=True, default=str), ([], env))[0].append(r.path.name)
    out = []
    for names, env in seen.values():
        label = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        out.append((label, env))
    return out


KIND_TITLES = {"train": "trained runs", "eval": "evaluated runs (no training)", "tta": "test-time adaptation runs",
               "continual": "continual runs"}  # fmt: skip


def write_run_report(run_dirs: Sequence[Path], out: Path, title: str = "vlprompt report") -> Path:
    """Load ``run_dirs``, aggregate seeds and write ``out`` (HTML)."""
    runs = [load_run(p) for p in reportable_runs(run_dirs)]  # failed or unfinished runs are skipped, with a warning
    if not runs:
        raise ConfigError("no run directories given")
    groups = group_runs(runs)
    sections = [("runs", runs_table(groups))]
    for kind, heading in KIND_TITLES.items():
        of_kind = [g for g in groups if g[0].kind == kind]
        if of_kind:
            note = "<p class='note'>mean ± std over seeds; the <i>chance</i> row is a random ranking's score.</p>"
            sections.append((f"results: {heading}", note + "".join(metric_tables(of_kind))))
    entries = tta_entries(runs)
    table, plot = tta_table(entries), tta_plot(entries)
    if table or plot:
        sections.append(("test-time adaptation against the 0-step baseline", table + plot))
    if any(g[0].kind == "tta" for g in groups):
        timing = tta_timing_table([g for g in groups if g[0].kind == "tta"])
        sections.append(("test-time adaptation: time", timing))
    curves = (("recall@K", recall_curves(groups)), ("validation during training", validation_curves(runs)))
    sections += [(heading, plot) for heading, plot in curves if plot is not None]
    for run in (r for r in runs if r.kind == "continual"):
        figures = []
        for metric in [m for m in run.matrices if m.endswith("R@1")][:2] or list(run.matrices)[:1]:
            rows = [[math.nan if v is None else v for v in row] for row in run.matrices[metric]]
            labels = [f"after {run.tasks[i]}" if i < len(run.tasks) else str(i) for i in range(len(rows))]
            figures.append(heatmap(rows, labels, run.tasks, f"{metric} (row: after training on, column: task)"))
        sections.append((f"{run.path.name}: accuracy matrices ({run.tested_on})", side_by_side(figures)))
    sections.append(("environment", environment_html(environments(runs))))
    names = [k for r in runs for k in [*r.metrics, *r.facts]] + (["gain"] if table else [])
    sections.append(("what the numbers mean", glossary_html(names, [MEAN_STD])))
    kinds = Counter(r.kind for r in runs)
    intro = (f"<p class='note'>Written {now_utc()} from {len(runs)} run director{'ies' if len(runs) > 1 else 'y'} "
             f"({', '.join(f'{n} {k}' for k, n in kinds.items())}); runs that differ only in their seed are one "
             f"row.</p>")  # fmt: skip
    return write_report(out, title, sections, intro)
