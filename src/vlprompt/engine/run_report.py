"""``vlprompt report RUN_DIR...``: one HTML page over finished runs (train, continual, TTA), seeds aggregated.

Runs whose resolved configs differ only in ``seed`` (and where they were written) form one group, reported as
mean ± std (sample standard deviation, n-1) with the number of seeds. Plots: recall@K curves per direction,
validation curves over epochs, continual accuracy matrices, and test-time adaptation per domain (with the gain
over the zero-shot run of the same domain when the report holds one).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from vlprompt.engine.report import bar_chart, figure_to_html, heatmap, html_table, write_report
from vlprompt.errors import ConfigError

#: Config keys that do not change what a run measures (a group may differ in them).
NOT_DEFINING = ("seed", "out_dir", "run_name", "resume", "device")
#: Headline metrics for TTA per domain, first present wins.
TTA_KEYS = ("cls/top1", "i2t/R@1", "t2i/R@1")


@dataclass
class Run:
    """What one run directory holds, flattened for tables and plots."""

    path: Path
    kind: str  # train | continual | tta
    config: dict[str, Any]
    metrics: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)  # per-epoch validation (train runs)
    matrices: dict[str, list[list[float | None]]] = field(default_factory=dict)  # continual runs
    tasks: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "?"))

    @property
    def domain(self) -> str:
        """The evaluated data, named by its test file (or root)."""
        data = self.config.get("data", {})
        return Path(str(data.get("test") or data.get("root") or "?")).stem

    def group_key(self) -> str:
        defining = {k: v for k, v in self.config.items() if k not in NOT_DEFINING}
        return json.dumps(defining, sort_keys=True, default=str)


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_run(path: Path) -> Run:
    """Read a run directory written by ``train``, ``continual`` or ``tta``."""
    path = Path(path)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{path} is not a run directory (no config.yaml)")
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True) or {}
    if (path / "continual.json").is_file():
        data = json.loads((path / "continual.json").read_text())
        summary = {k: v for k, v in data.get("summary", {}).items() if isinstance(v, (int, float))}
        tasks = [t.get("name", str(i)) for i, t in enumerate(data.get("tasks", []))]
        return Run(path, "continual", config, _numbers(summary), matrices=data.get("matrices", {}), tasks=tasks)
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise ConfigError(f"{path} has no results yet (no metrics.json or continual.json): did the run finish?")
    data = json.loads(metrics_file.read_text())
    if "test" in data or "val" in data:
        metrics = {**_numbers(data.get("val", {}), "val/"), **_numbers(data.get("test", {}))}
        metrics["trainable"] = float(data.get("params", {}).get("trainable", 0))
        curve_file = path / "metrics.jsonl"
        curve = [json.loads(line) for line in curve_file.read_text().splitlines()] if curve_file.is_file() else []
        return Run(path, "train", config, metrics, curve=curve)
    return Run(path, "tta", config, _numbers(data))


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


def summary_table(groups: Sequence[Sequence[Run]]) -> str:
    """One row per group: mean ± std of every metric the group's runs share."""
    rows, columns = [], []
    for group in groups:
        shared = set.intersection(*(set(r.metrics) for r in group))
        keys = [k for k in group[0].metrics if k in shared]
        row: dict[str, Any] = {"run": group_label(group), "kind": group[0].kind, "method": group[0].method,
                               "seeds": len(group)}  # fmt: skip
        for k in keys:
            mean, std = mean_std([r.metrics[k] for r in group])
            row[k] = f"{mean:.2f} ± {std:.2f}" if len(group) > 1 else round(mean, 2)
            columns.append(k)
        rows.append(row)
    return html_table(rows, ["run", "kind", "method", "seeds", *dict.fromkeys(columns)])


def recall_curves(groups: Sequence[Sequence[Run]]) -> str | None:
    """Recall@K against K, one line per group and direction (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    drawn = False
    for group in groups:
        for direction in ("t2i", "i2t", "t2v", "v2t"):
            ks = [k for k in (1, 5, 10) if all(f"{direction}/R@{k}" in r.metrics for r in group)]
            if len(ks) < 2:
                continue
            means = [mean_std([r.metrics[f"{direction}/R@{k}"] for r in group])[0] for k in ks]
            ax.plot(ks, means, marker="o", label=f"{group_label(group)} {direction}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_xticks([1, 5, 10])
    ax.legend(fontsize=7)
    return figure_to_html(fig)


def validation_curves(runs: Sequence[Run]) -> str | None:
    """Validation R@1 over epochs of the train runs that evaluated during training."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    drawn = False
    for run in runs:
        keys = [k for k in (run.curve[0] if run.curve else {}) if k.startswith("val/") and k.endswith("R@1")]
        for key in keys:
            ax.plot([e["epoch"] for e in run.curve], [e[key] for e in run.curve], marker="o",
                    label=f"{run.path.name} {key}")  # fmt: skip
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("R@1 (%)")
    ax.legend(fontsize=7)
    return figure_to_html(fig)


def tta_domains(runs: Sequence[Run]) -> str | None:
    """TTA headline metric per domain and method; bars are gains over zero-shot when a zero-shot run is there."""
    tta = [r for r in runs if r.kind == "tta"]
    key = next((k for k in TTA_KEYS if any(k in r.metrics for r in tta)), None)
    if key is None:
        return None
    domains = list(dict.fromkeys(r.domain for r in tta))
    methods = list(dict.fromkeys(r.method for r in tta))

    def value(method: str, domain: str) -> float:
        vals = [r.metrics[key] for r in tta if r.method == method and r.domain == domain and key in r.metrics]
        return statistics.fmean(vals) if vals else math.nan

    base = "zeroshot" if "zeroshot" in methods else None
    series = {}
    for m in methods:
        if m == base:
            continue
        vals = [value(m, d) - (value(base, d) if base else 0.0) for d in domains]
        series[m] = [0.0 if math.isnan(v) else v for v in vals]
    if not series:
        return None
    label = f"{key} gain over zero-shot" if base else key
    return bar_chart(domains, series, label, "test-time adaptation per domain")


def write_run_report(run_dirs: Sequence[Path], out: Path, title: str = "vlprompt report") -> Path:
    """Load ``run_dirs``, aggregate seeds and write ``out`` (HTML)."""
    runs = [load_run(Path(p)) for p in run_dirs]
    if not runs:
        raise ConfigError("no run directories given")
    groups = group_runs(runs)
    sections = [("results (mean ± std over seeds)", summary_table(groups))]
    for heading, plot in (
        ("recall@K", recall_curves(groups)),
        ("validation during training", validation_curves(runs)),
        ("test-time adaptation", tta_domains(runs)),
    ):
        if plot is not None:
            sections.append((heading, plot))
    for run in (r for r in runs if r.kind == "continual"):
        for metric in [m for m in run.matrices if m.endswith("R@1")][:2] or list(run.matrices)[:1]:
            rows = [[math.nan if v is None else v for v in row] for row in run.matrices[metric]]
            labels = [f"after {run.tasks[i]}" if i < len(run.tasks) else str(i) for i in range(len(rows))]
            sections.append((f"{run.path.name}: {metric}", heatmap(rows, labels, run.tasks, metric)))
    return write_report(out, title, sections)
