"""HTML reports a person can read without the code: tables, plots (embedded PNG), chance levels, definitions.

The pieces here are shared by ``vlprompt report`` (:mod:`vlprompt.reports.runs`), the demo and the continual
runners: number formatting (a count is ``6,144``, a percentage ``81.4``), tables that fit a 1200 px window,
multi-panel bar charts with chance level and 0-step baseline marks, the glossary of every metric name a page shows,
the environment (versions, device, git SHA) and the date. Plain HTML and CSS, no script.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are written headless
import matplotlib.pyplot as plt  # noqa: E402

from vlprompt.eval.cil import CIL_DEFINITIONS  # noqa: E402
from vlprompt.eval.continual import DEFINITIONS as CONTINUAL_DEFINITIONS  # noqa: E402

#: Width of the page's content in CSS pixels; tables and figures are sized to fit it without scrolling.
PAGE_WIDTH = 1100
#: Figure resolution: a figure ``w`` inches wide is ``w * DPI`` pixels, shown at most PAGE_WIDTH wide.
DPI = 100
#: Direction prefixes of metric names, in reading order, with what they mean.
DIRECTIONS = {
    "t2i": "text → image",
    "i2t": "image → text",
    "t2v": "text → video",
    "v2t": "video → text",
    "i2i": "image → image",
    "t2t": "text → text",
    "i2it": "image → images and texts",
    "t2it": "text → texts and images",
    "cls": "classification",
}


class Html(str):
    """Markup that a table cell inserts as is (everything else is escaped)."""

    numeric = False  # right-aligned like a number


class NumberHtml(Html):
    """Markup showing a number (a mean with its ± std)."""

    numeric = True


# ---- numbers ---------------------------------------------------------------------------------------------
def fmt_number(value: Any, decimals: int = 1) -> str:
    """A count with thousands separators (``6,144``), a measurement with ``decimals`` places, NaN as ``–``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "–"
    return f"{value:,.{decimals}f}"


def mean_std_cell(mean: float, std: float | None, decimals: int = 2) -> NumberHtml:
    """``mean`` with ``± std`` on a second, smaller line (keeps columns narrow)."""
    head = html.escape(fmt_number(mean, decimals))
    if std is None:
        return NumberHtml(head)
    return NumberHtml(f"{head}<br><span class='std'>± {html.escape(fmt_number(std, decimals))}</span>")


# ---- chance levels ---------------------------------------------------------------------------------------
def chance_recall(k: int, gallery: int, positives: Iterable[int]) -> float:
    """Expected R@K (%) of a random ranking: a query with ``g`` correct items among ``gallery`` finds one in
    its top ``k`` with probability ``1 - C(gallery - g, k) / C(gallery, k)``; averaged over the queries."""
    counts = Counter(int(g) for g in positives)
    if gallery <= 0 or not counts:
        return math.nan
    total = 0.0
    for g, n in counts.items():
        miss = 1.0  # C(N-g, k) / C(N, k) as a product, no big integers
        for i in range(min(k, gallery)):
            miss *= max(0.0, (gallery - g - i) / (gallery - i))
        total += n * (1.0 - miss)
    return 100.0 * total / sum(counts.values())


def chance_topk(k: int, classes: int) -> float:
    """Expected top-k accuracy (%) of a random classifier over ``classes`` classes."""
    return 100.0 * min(k, classes) / classes if classes > 0 else math.nan


# ---- metric names: order and glossary --------------------------------------------------------------------
_MEASURE_ORDER = ("R@", "top", "acc@", "MdR", "MnR", "NDCG@", "order_acc", "rsum")


def metric_sort_key(key: str) -> tuple:
    """Reading order of metric names: test before ``val/``; directions as in DIRECTIONS; within one direction
    R@1, R@5, R@10 (by K, not as text), then MdR, MnR, NDCG@K, the rest; then the continual statistic."""
    parts = key.split("/")
    val = parts[0] == "val"
    parts = parts[1:] if val else parts
    direction = next((i for i, p in enumerate(DIRECTIONS) if p in parts), len(DIRECTIONS))
    measure, number, rest = len(_MEASURE_ORDER), 0, key
    for i, prefix in enumerate(_MEASURE_ORDER):
        hit = next((p for p in parts if p.startswith(prefix)), None)
        if hit is not None:
            digits = re.findall(r"\d+", hit)
            measure, number, rest = i, int(digits[0]) if digits else 0, "/".join(p for p in parts if p != hit)
            break
    return (val, direction, measure, number, rest)


def metric_group(key: str) -> str:
    """The header a metric column sits under: everything before its last ``/`` (``val/t2i``, ``cl/i2t/R@1``)."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


#: (pattern over a metric or column name, term, definition). Retrieval definitions follow vlprompt.eval.retrieval.
GLOSSARY: list[tuple[str, str, str]] = [
    (
        r"(^|/)R@\d+($|/)",
        "R@K",
        "recall at K (%): the share of queries whose best-scoring correct item is among the "
        "K highest-scoring items of the gallery (a tie with a correct item counts for the query). Higher is better.",
    ),
    (r"(^|/)MdR($|/)", "MdR", "median rank of the best correct item (1 = ranked first). Lower is better."),
    (r"(^|/)MnR($|/)", "MnR", "mean rank of the best correct item (1 = ranked first). Lower is better."),
    (r"(^|/)rsum$", "rsum", "R@1 + R@5 + R@10 of both directions (at most 600)."),
    (
        r"NDCG@\d+",
        "NDCG@K",
        "normalised discounted cumulative gain of the top K (%), with graded relevance (the "
        "ROUGE-L agreement of captions, as in RVLR). Higher is better.",
    ),
    (
        r"order_acc",
        "order_acc",
        "share (%) of time-reversed video pairs where each caption scores its own video "
        "above the reversed one; 50 = blind to the order of frames.",
    ),
    (r"top1|acc@1", "top-1 accuracy (cls/top1, acc@1)", "share (%) of test images whose true class scores highest."),
    (
        r"top5|acc@5",
        "top-5 accuracy (cls/top5, acc@5)",
        "share (%) of test images whose true class is among the five highest-scoring classes.",
    ),
    (r"/last$", "last (continual)", CONTINUAL_DEFINITIONS["last"]),
    (r"/avg_over_time$", "avg_over_time", CONTINUAL_DEFINITIONS["avg_over_time"]),
    (r"/avg_incremental$", "avg_incremental", CONTINUAL_DEFINITIONS["avg_incremental"]),
    (r"/forgetting_lpi$", "forgetting_lpi", CONTINUAL_DEFINITIONS["forgetting_lpi"]),
    (r"/forgetting$| forget$", "forgetting (continual)", CONTINUAL_DEFINITIONS["forgetting"]),
    (r"/bwt$", "bwt", CONTINUAL_DEFINITIONS["bwt"]),
    (r"(^|/)(faa|FAA)$", "FAA", CIL_DEFINITIONS["faa"]),
    (r"(^|/)(caa|CAA)$", "CAA", CIL_DEFINITIONS["caa"]),
    (r"(^|/)(ffm|FFM)$", "FFM", CIL_DEFINITIONS["ffm"]),
    (r"forgetting_coda|forgetting \(CODA\)", "forgetting (CODA)", CIL_DEFINITIONS["forgetting_coda"]),
    (
        r"task_acc|task id|^route ",
        "task identity / routing accuracy",
        "share (%) of test samples (image or text "
        "queries) routed to the prompts of their own task after the last task.",
    ),
    (
        r"^trainable",
        "trainable",
        "number of trainable parameters (per task for continual runs); everything else stays frozen.",
    ),
    (r"^samples$", "samples", "test samples (queries) the test-time adaptation ran on."),
    (
        r"^seconds_total$|^time \(s\)$|^train_seconds$",
        "time (s), total (s), seconds_total",
        "wall-clock seconds of the whole run (for TTA: "
        "encoding the gallery and reward features once, then every sample).",
    ),
    (
        r"^seconds_setup$",
        "setup (s), seconds_setup",
        "TTA: seconds spent once per run before the first sample (encoding the "
        "gallery and the reward models' features).",
    ),
    (
        r"^seconds_adapt_per_sample$|^ms/sample$",
        "per sample (ms), seconds_adapt_per_sample",
        "TTA: time per test sample of the episodic loop "
        "(building the views, the adaptation steps and the prediction); excludes the setup (ms/sample: milliseconds).",
    ),
    (
        r"gain",
        "gain",
        "TTA: adapted score minus the score of the same data, backbone and direction with 0 "
        "adaptation steps (percentage points; positive = adaptation helped).",
    ),
]
#: Shown on every page with numbers.
ALWAYS = [
    (
        "chance",
        "expected score of a model that ranks at random: R@K = 1 − C(N−g, K) / C(N, K) for a query with g "
        "correct items in a gallery of N, averaged over queries; top-k accuracy = k / (number of classes). Dashed "
        "marks in the plots.",
    ),
]
#: Pages over several seeds add this.
MEAN_STD = (
    "mean ± std",
    "runs that differ only in their seed: mean and sample standard deviation (n − 1) over seeds.",
)


def glossary_html(names: Iterable[str], extra: Sequence[tuple[str, str]] = ()) -> str:
    """A definition list of the directions and terms that ``names`` (metric keys, column headers) use."""
    names = list(dict.fromkeys(names))
    items: list[tuple[str, str]] = []
    used = {p for n in names for p in re.split(r"[/ ]", n)}
    items += [(d, f"{meaning} retrieval" if d != "cls" else meaning) for d, meaning in DIRECTIONS.items() if d in used]
    for pattern, term, text in GLOSSARY:
        if any(re.search(pattern, n) for n in names) and term not in dict(items):
            items.append((term, text))
    items += [i for i in [*extra, *ALWAYS] if i[0] not in dict(items)]
    body = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(d)}</dd>" for t, d in items)
    return f"<dl class='glossary'>{body}</dl>"


# ---- environment and date --------------------------------------------------------------------------------
ENV_FIELDS = ("vlprompt", "git_sha", "device", "python", "torch", "open_clip", "numpy", "platform")


def now_utc() -> str:
    """The current date and time, UTC, to the minute."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def environment_html(envs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The software and machine of each distinct environment ``(who ran in it, env.json)`` as one table."""
    if not envs:
        return "<p class='note'>No environment recorded (the runs have no env.json).</p>"
    columns = [label for label, _ in envs]
    rows = []
    for name in ENV_FIELDS:
        row: dict[str, Any] = {"": name}
        for label, env in envs:
            value = env.get(name)
            row[label] = "not recorded" if value in (None, "") else str(value)
        rows.append(row)
    return html_table(rows, ["", *columns], css="env")


# ---- tables ----------------------------------------------------------------------------------------------
def html_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    labels: dict[str, str] | None = None,
    groups: Sequence[tuple[str, int]] | None = None,
    decimals: int = 1,
    css: str = "",
) -> str:
    """An HTML table of ``rows`` restricted to ``columns``.

    ``labels`` renames headers; ``groups`` adds a first header row of ``(title, number of columns)`` spans.
    Integers print with thousands separators, floats with ``decimals`` places, :class:`Html` values as is.
    Numbers align right, text left; a column of numbers has its header on the right too.
    """
    labels = labels or {}

    def numeric(value: Any) -> bool:
        if isinstance(value, Html):
            return value.numeric
        return isinstance(value, int | float) and not isinstance(value, bool)

    def cell(value: Any) -> str:
        text = value if isinstance(value, Html) else html.escape(fmt_number(value, decimals))
        return f"<td class='num'>{text}</td>" if numeric(value) else f"<td>{text}</td>"

    number_columns = {
        c for c in columns if any(numeric(r.get(c)) for r in rows) and all(
            numeric(r.get(c)) or r.get(c) in (None, "", "–", "-") or isinstance(r.get(c), Html) for r in rows)
    }  # fmt: skip
    head = ""
    if groups:
        head = "<tr>" + "".join(f"<th colspan='{n}' class='group'>{html.escape(t)}</th>" for t, n in groups) + "</tr>"
    head += "<tr>" + "".join(
        f"<th{' class=num' if c in number_columns else ''}>{html.escape(labels.get(c, c))}</th>" for c in columns
    ) + "</tr>"  # fmt: skip
    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    cls = f" class='{css}'" if css else ""
    return f"<table{cls}><thead>{head}</thead><tbody>{body}</tbody></table>"


# ---- plots -----------------------------------------------------------------------------------------------
def figure_to_html(fig: plt.Figure, alt: str = "plot") -> str:
    """A matplotlib figure as an inline ``<img>`` (PNG), never wider than the page."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


@dataclass
class Panel:
    """One bar chart: x groups, one bar per series in each group, optional chance level and baseline marks."""

    title: str
    groups: list[str]
    series: dict[str, list[float]]  # series name -> one value per group (NaN: no bar)
    ylabel: str = "%"
    chance: list[float] = field(default_factory=list)  # per group (NaN: unknown)
    baseline: dict[str, list[float]] = field(default_factory=dict)  # series -> per group: a 0-step mark
    lower_is_better: bool = False


def _draw_panel(ax: plt.Axes, panel: Panel, colours: dict[str, Any], show_values: bool) -> None:
    n = max(1, len(panel.series))
    width = min(0.8 / n, 0.3)  # one or two series: slim bars rather than slabs
    for i, (name, values) in enumerate(panel.series.items()):
        xs = [g - width * n / 2 + (i + 0.5) * width for g in range(len(panel.groups))]
        heights = [0.0 if math.isnan(v) else v for v in values]
        bars = ax.bar(xs, heights, width * 0.92, label=name, color=colours[name])
        if show_values:
            ax.bar_label(bars, [("" if math.isnan(v) else f"{v:.1f}") for v in values], fontsize=7, padding=1)
        for x, b in zip(xs, panel.baseline.get(name) or [], strict=False):
            if not math.isnan(b):
                first = "0-step baseline" not in ax.get_legend_handles_labels()[1]
                ax.hlines(b, x - width / 2, x + width / 2, colors="black", linewidth=2.2,
                          label="0-step baseline" if first else "_nolegend_")  # fmt: skip
    for g, c in enumerate(panel.chance):
        if not math.isnan(c):
            first = "chance" not in ax.get_legend_handles_labels()[1]
            ax.hlines(c, g - 0.45, g + 0.45, colors="0.35", linestyles="--", linewidth=1.2,
                      label="chance" if first else "_nolegend_")  # fmt: skip
    ax.set_xticks(range(len(panel.groups)), panel.groups, fontsize=8,
                  rotation=20 if sum(len(g) for g in panel.groups) > 40 else 0,
                  ha="right" if sum(len(g) for g in panel.groups) > 40 else "center")  # fmt: skip
    ax.set_xlim(-0.5, len(panel.groups) - 0.5)
    ax.set_ylabel(panel.ylabel + (" (lower is better)" if panel.lower_is_better else ""), fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def bar_panels(panels: Sequence[Panel], title: str = "", per_row: int = 3) -> str:
    """Panels side by side (``per_row`` at most), one shared legend below; sized to the page width."""
    panels = [p for p in panels if p.groups and p.series]
    if not panels:
        return ""
    cols = min(per_row, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(min(11.0, 3.7 * cols + 0.6), 3.4 * rows + 0.5), squeeze=False)
    cmap = plt.get_cmap("tab10")  # one colour per series name across all panels, so one legend serves them all
    colours = {name: cmap(i % 10) for i, name in enumerate(dict.fromkeys(n for p in panels for n in p.series))}
    for ax, panel in zip(axes.flat, panels, strict=False):
        bars = len(panel.groups) * len(panel.series)
        _draw_panel(ax, panel, colours, show_values=bars <= 24)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _shared_legend(fig, axes, title)
    return figure_to_html(fig, title or panels[0].title)


def _shared_legend(fig: plt.Figure, axes: Any, title: str) -> None:
    """One legend below all panels (each label once), the title above; lays the figure out."""
    found: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, h)
    marks = ("0-step baseline", "chance")  # after the series they mark
    handles = {k: h for k, h in found.items() if k not in marks} | {k: found[k] for k in marks if k in found}
    # one row when the labels fit in it, else columns of at most three
    ncol = max(1, len(handles) if sum(len(k) + 6 for k in handles) < 120 else 3)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(ncol, len(handles)), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    legend_rows = math.ceil(len(handles) / ncol) if handles else 0
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, min(0.5, 0.22 * legend_rows / height), 1, 1))


#: A line of a :func:`line_panels` panel: (label, xs, ys, style); style "chance" draws it dashed grey.
Line = tuple[str, Sequence[float], Sequence[float], str]


def line_panels(panels: Sequence[tuple[str, str, Sequence[Line]]], ylabel: str = "%") -> str | None:
    """Panels ``(title, xlabel, lines)`` side by side (3 per row), one colour per label across panels, one legend
    below; None when no panel has a line other than chance."""
    panels = [p for p in panels if any(style != "chance" for *_, style in p[2])]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(min(11.0, 3.7 * cols + 0.6), 3.3 * rows + 0.6), squeeze=False)
    labels = list(dict.fromkeys(label for _, _, lines in panels for label, *_, style in lines if style != "chance"))
    chances = list(dict.fromkeys(label for _, _, lines in panels for label, *_, style in lines if style == "chance"))
    cmap = plt.get_cmap("tab10")
    for ax, (title, xlabel, lines) in zip(axes.flat, panels, strict=False):
        for label, xs, ys, style in lines:
            if style == "chance":
                dash = ("--", ":", "-.")[chances.index(label) % 3]
                ax.plot(xs, ys, linestyle=dash, color="0.35", linewidth=1.2, label=label)
            else:
                ax.plot(xs, ys, marker="o", label=label, color=cmap(labels.index(label) % 10))
        ticks = sorted({x for _, xs, _, _ in lines for x in xs})
        if len(ticks) <= 8:  # K = 1, 5, 10 or a few epochs: the measured points, not 1.2, 1.4, ...
            ax.set_xticks(ticks)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _shared_legend(fig, axes, "")
    return figure_to_html(fig, panels[0][0])


def heatmap(
    matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], title: str, fmt: str = "{:.1f}"
) -> str:
    """A matrix (e.g. continual accuracy R[i][j]) as an annotated heatmap; NaN cells stay blank."""
    import numpy as np

    values = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.55 * len(cols) + 1.5), max(2.5, 0.45 * len(rows) + 1.2)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    low, high = np.nanmin(values), np.nanmax(values)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):  # dark text on the light (high) end of viridis, white on the dark end
            light = high > low and (v - low) / (high - low) > 0.6
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="black" if light else "white")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    return figure_to_html(fig, title)


def side_by_side(figures: Sequence[str | tuple[str, str]]) -> str:
    """Figures (``<img>`` markup, or ``(caption, markup)``) in a row that wraps, instead of one under the other."""
    parts = []
    for figure in figures:
        caption, markup = figure if isinstance(figure, tuple) else ("", figure)
        below = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        parts.append(f"<figure>{markup}{below}</figure>")
    return "<div class='figures'>" + "".join(parts) + "</div>"


# ---- the page --------------------------------------------------------------------------------------------
STYLE = (
    f"body{{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:{PAGE_WIDTH}px;padding:0 1em;color:#222;"
    "line-height:1.35}"
    "h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:13px;max-width:100%}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}"
    "td.num,th.num{text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3;font-weight:600}th.group{text-align:center;background:#e8eef6}"
    "td:first-child{overflow-wrap:anywhere;max-width:260px}"
    "table.env td{overflow-wrap:anywhere;max-width:420px}"
    ".nowrap{white-space:nowrap}.std{color:#666;font-size:11px}.note{color:#555;font-size:14px}"
    "img.plot{display:block;max-width:100%;height:auto;margin:.6em 0}"
    ".figures{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.figures img.plot{margin:0}"
    "figure{margin:0}figcaption{font-size:13px;color:#555;text-align:center}"
    "dl.glossary{font-size:14px;display:grid;grid-template-columns:max-content 1fr;gap:.35em 1em}"
    "dl.glossary dt{font-weight:600;max-width:260px}dl.glossary dd{margin:0}"
)


def write_report(path: Path, title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> Path:
    """Write an HTML page: the title, ``intro`` (markup), then ``(heading, html)`` sections."""
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{intro}",
    ]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{content}")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
