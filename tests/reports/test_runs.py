"""``vlprompt report``: loading each kind of run directory, grouping seeds, mean ± std, labels, baselines, plots."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from vlprompt.cli.main import main
from vlprompt.errors import ConfigError
from vlprompt.reports.pages import chance_recall, chance_topk, fmt_number, glossary_html, metric_sort_key
from vlprompt.reports.runs import (
    MAX_METRIC_COLUMNS,
    chance_levels,
    data_label,
    group_runs,
    load_run,
    mean_std,
    metric_tables,
    tta_entries,
    tta_panels,
    write_run_report,
)

ENV = {"vlprompt": "0.1.0", "git_sha": "0123456789abcdef0123456789abcdef01234567", "python": "3.11.7",
       "torch": "2.14.1", "open_clip": "3.3.0", "numpy": "2.4.6", "platform": "Linux-test", "seed": 0}  # fmt: skip


def _run(root: Path, name: str, config: str, files: dict[str, object], env: dict | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    for file, content in files.items():
        text = "\n".join(json.dumps(c) for c in content) if file.endswith(".jsonl") else json.dumps(content)
        (path / file).write_text(text)
    if env is not None:
        (path / "env.json").write_text(json.dumps(env))
    return path


def _train(root: Path, name: str, seed: int, r1: float, method: str = "coop", trainable: int = 512) -> Path:
    # R@10 before R@5, as in a JSON file sorted by key
    test = {"t2i/R@1": r1, "t2i/R@10": r1 + 30, "t2i/R@5": r1 + 20, "i2t/R@1": r1 + 1, "i2t/R@10": 70.0,
            "i2t/R@5": 60.0}  # fmt: skip
    curve = [{"epoch": 1, "step": 3, "val/t2i/R@1": r1 - 5}, {"epoch": 2, "step": 6, "val/t2i/R@1": r1}]
    config = f"method: {{name: {method}}}\nseed: {seed}\nrun_name: {name}\ndata: {{test: test_sketch.json}}\n"
    return _run(root, name, config, {"metrics.json": {"test": test, "params": {"trainable": trainable}},
                                     "metrics.jsonl": curve}, ENV)  # fmt: skip


def _tta(root: Path, name: str, direction: str, steps: int, r1: float, test: str = "test_sketch.json", seed: int = 0,
         **extra) -> Path:  # fmt: skip
    config = (f"method: {{name: rlcf_retrieval, direction: {direction}}}\nseed: {seed}\n"
              f"data: {{format: karpathy, root: /data/world, test: {test}}}\n"
              f"tta: {{steps: {steps}, max_samples: 100, shuffle: true}}\n")  # fmt: skip
    metrics = {f"{direction}/R@1": r1, f"{direction}/R@5": r1 + 20, "samples": 100, "trainable": 0, **extra}
    return _run(root, name, config, {"metrics.json": metrics})


def test_seeds_group_into_mean_and_std(tmp_path: Path) -> None:
    runs = [load_run(_train(tmp_path, f"coop_s{s}", s, r1)) for s, r1 in [(0, 30.0), (1, 32.0), (2, 34.0)]]
    runs.append(load_run(_train(tmp_path, "vpt", 0, 40.0, method="vpt", trainable=6144)))
    groups = group_runs(runs)
    assert [len(g) for g in groups] == [3, 1]
    assert mean_std([30.0, 32.0, 34.0]) == (32.0, 2.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    out = tmp_path / "report.html"
    assert main(["report", *(str(r.path) for r in runs), "--out", str(out)]) == 0
    html = out.read_text()
    assert "32.00<br><span class='std'>± 2.00</span>" in html  # t2i/R@1 over the three seeds
    assert "<th class=num>R@1</th><th class=num>R@5</th><th class=num>R@10</th>" in html  # as people read them
    assert "recall@K" in html and "validation during training" in html
    assert html.count("<img") == 2
    # a parameter count is a count, not a measurement; the seeds' equal counts are shown once
    assert "6,144" in html and "6,144.0" not in html and "512.0" not in html


def test_runs_are_labelled_by_their_data_not_by_the_test_file_name() -> None:
    # two datasets with the same file names: the colour and the monochrome rendering of the same ids
    assert data_label({"root": "/data/emoji_colour", "test": "test.json"}, "test") == "emoji_colour"
    assert data_label({"root": "/data/emoji_mono", "test": "test.json"}, "test") == "emoji_mono"
    assert data_label({"root": "/data/emoji_colour", "test": "/data/emoji_mono/test.json"}, "test") == "emoji_mono"
    assert data_label({"root": "world", "test": "retrieval/test_sketch.json"}, "test") == "world/retrieval/test_sketch"
    assert data_label({"root": "world", "test": "classification/sketch/test"}, "test") == "world/classification/sketch"
    assert data_label({"root": "/data/imagenet-a"}, "test") == "imagenet-a"  # TTA: the root is the test folder
    assert data_label({"root": "/data/msrvtt", "test": "default"}, "test") == "msrvtt"
    assert data_label({"root": "/data/coco", "train": "train.json"}, "train") == "coco"
    assert data_label({"root": "/data/coco"}, "train") == ""


def test_the_runs_table_names_tested_and_trained_data(tmp_path: Path) -> None:
    colour = "method: {name: coop}\ndata: {root: /d/emoji_colour, train: train.json, test: test.json}\n"
    mono = "method: {name: coop}\ndata: {root: /d/emoji_colour, train: train.json, test: /d/emoji_mono/test.json}\n"
    metrics = {"metrics.json": {"test": {"t2i/R@1": 1.0}, "params": {"trainable": 1}}}
    a, b = _run(tmp_path, "a", colour, metrics), _run(tmp_path, "b", mono, metrics)
    html = write_run_report([a, b], tmp_path / "r.html").read_text()
    rows = re.findall(r"<tr><td>(a|b)</td><td>train</td><td>coop</td><td>([^<]*)</td><td>([^<]*)</td>", html)
    assert rows == [("a", "emoji_colour", "emoji_colour"), ("b", "emoji_mono", "emoji_colour")]


def test_metric_columns_come_in_reading_order() -> None:
    keys = ["val/t2i/R@1", "rsum", "i2t/R@1", "t2i/MnR", "t2i/R@10", "t2i/R@5", "t2i/MdR", "t2i/R@1"]
    assert sorted(keys, key=metric_sort_key) == [
        "t2i/R@1", "t2i/R@5", "t2i/R@10", "t2i/MdR", "t2i/MnR", "i2t/R@1", "rsum", "val/t2i/R@1"
    ]  # fmt: skip
    assert sorted(["cl/t2i/R@1/last", "cl/i2t/R@1/last"], key=metric_sort_key) == ["cl/t2i/R@1/last",
                                                                                    "cl/i2t/R@1/last"]  # fmt: skip


def test_tables_stay_narrow_however_many_metrics(tmp_path: Path) -> None:
    test = {f"{d}/{m}": 1.0 for d in ("t2i", "i2t") for m in ("R@1", "R@5", "R@10", "R@50", "MdR", "MnR")}
    test |= {f"{d}/NDCG@{k}": 2.0 for d in ("i2i", "t2t", "i2it", "t2it") for k in (10, 20, 50)}
    path = _run(tmp_path, "wide", "method: {name: zeroshot}\n", {"metrics.json": {"test": test}})
    tables = metric_tables(group_runs([load_run(path)]))
    assert len(tables) > 1
    columns = 0
    for table in tables:
        header = re.findall(r"<tr>(.*?)</tr>", table)[1]  # the second header row names the columns
        assert header.count("<th") <= 3 + MAX_METRIC_COLUMNS  # run, tested on, seeds + the metrics
        columns += header.count("<th") - 3
    assert columns == len(test)  # every metric in some table, once


def _retrieval_runs(tmp_path: Path) -> list[Path]:
    return [
        _tta(tmp_path, "zs_i2t", "i2t", 0, 18.0),
        _tta(tmp_path, "rlcf_i2t", "i2t", 8, 22.0),
        _tta(tmp_path, "zs_t2i", "t2i", 0, 21.0),
        _tta(tmp_path, "rlcf_t2i", "t2i", 8, 23.5),
        _tta(tmp_path, "zs_other", "i2t", 0, 90.0, test="test_noisy.json"),  # other data: never a baseline here
    ]


def test_tta_gain_is_over_the_0_step_run_of_the_same_data_and_direction(tmp_path: Path) -> None:
    runs = [load_run(p) for p in _retrieval_runs(tmp_path)]
    assert all(r.method == "rlcf_retrieval" for r in runs)  # the zero-shot recipe is rlcf_retrieval with 0 steps
    entries = {(e.group[0].path.name, e.key): e for e in tta_entries(runs)}
    i2t = entries["rlcf_i2t", "i2t/R@1"]
    assert i2t.baselines == [18.0] and i2t.sources == ["zs_i2t"]
    t2i = entries["rlcf_t2i", "t2i/R@5"]
    assert t2i.baselines == [41.0] and t2i.sources == ["zs_t2i"]
    html = write_run_report([r.path for r in runs], tmp_path / "r.html").read_text()
    assert "<td class='num'>4.00</td><td>zs_i2t</td>" in html  # gain 22 - 18 and where the baseline came from


def test_tta_plot_shows_each_direction_only_with_its_own_runs(tmp_path: Path) -> None:
    runs = [load_run(p) for p in _retrieval_runs(tmp_path)]
    panels = {p.title.split(": ")[-1]: p for p in tta_panels(tta_entries(runs))}
    assert set(panels) == {"t2i/R@1", "i2t/R@1"}
    i2t = panels["i2t/R@1"]
    assert list(i2t.series) == ["rlcf_retrieval i2t, 8 steps"]
    assert i2t.groups == ["world/test_sketch"] and i2t.series["rlcf_retrieval i2t, 8 steps"] == [22.0]
    assert i2t.baseline["rlcf_retrieval i2t, 8 steps"] == [18.0]
    t2i = panels["t2i/R@1"]
    assert list(t2i.series) == ["rlcf_retrieval t2i, 8 steps"] and t2i.series["rlcf_retrieval t2i, 8 steps"] == [23.5]


def test_tta_baseline_from_the_run_itself_or_none(tmp_path: Path) -> None:
    own = _tta(tmp_path, "own", "i2t", 8, 22.0, before_adaptation={"i2t/R@1": 19.0, "i2t/R@5": 39.0})
    alone = _tta(tmp_path, "alone", "t2i", 8, 22.0, test="test_blurred.json")
    # a shuffled subset of another seed is other samples: no baseline for `alone`
    other_seed = _tta(tmp_path, "other_seed", "t2i", 0, 20.0, test="test_blurred.json", seed=1)
    entries = {(e.group[0].path.name, e.key): e for e in tta_entries([load_run(p) for p in (own, alone, other_seed)])}
    assert entries["own", "i2t/R@1"].baselines == [19.0]
    assert entries["own", "i2t/R@1"].sources == ["same run, before adapting"]
    assert entries["alone", "t2i/R@1"].baselines == []
    html = write_run_report([own, alone], tmp_path / "r.html").read_text()
    assert "none: run the same config with tta.steps=0" in html


def test_old_tta_timing_names_are_read(tmp_path: Path) -> None:
    old = load_run(_tta(tmp_path, "old", "i2t", 8, 22.0, seconds=30.0, seconds_per_sample=0.25))
    assert old.facts["seconds_total"] == 30.0 and old.facts["seconds_adapt_per_sample"] == 0.25
    assert old.facts["seconds_setup"] == pytest.approx(30.0 - 0.25 * 100)
    assert set(old.metrics) == {"i2t/R@1", "i2t/R@5"}  # timings are not scores
    new = load_run(_tta(tmp_path, "new", "i2t", 8, 22.0, seconds_total=31.0, seconds_setup=4.0,
                        seconds_adapt_per_sample=0.27))  # fmt: skip
    assert new.facts["seconds_setup"] == 4.0 and new.facts["seconds_total"] == 31.0
    html = write_run_report([old.path, new.path], tmp_path / "r.html").read_text()  # one group of two "seeds"
    assert "setup (s)" in html and "per sample (ms)" in html
    assert "<td class='num'>260.0<br><span class='std'>± 14.1</span></td>" in html  # 250 and 270 ms


def test_chance_levels() -> None:
    assert chance_recall(1, 100, [1] * 7) == pytest.approx(1.0)
    assert chance_recall(10, 10, [1]) == pytest.approx(100.0)
    assert chance_recall(5, 24, [2]) == pytest.approx(100.0 * (1 - (19 * 18) / (24 * 23)))  # 1 - C(22,5)/C(24,5)
    assert chance_recall(1, 10, [1, 2]) == pytest.approx(100.0 * (0.1 + 0.2) / 2)
    assert chance_topk(1, 4) == 25.0 and chance_topk(5, 4) == 100.0
    assert math.isnan(chance_recall(1, 0, [1]))


def test_chance_levels_of_a_config_read_its_test_split(image_text_set: Path, tmp_path: Path) -> None:
    config = {"data": {"format": "karpathy", "root": str(image_text_set), "test": "test.json"}}
    levels = chance_levels(config)  # 12 images with 2 captions each
    assert levels["t2i/R@1"] == pytest.approx(100 / 12) and levels["t2i/R@5"] == pytest.approx(500 / 12)
    assert levels["i2t/R@1"] == pytest.approx(100 * 2 / 24)
    assert levels["i2t/R@5"] == pytest.approx(100.0 * (1 - (19 * 18) / (24 * 23)))
    assert "t2i/order_acc" not in levels  # no time-reversed pairs in an image gallery
    assert chance_levels({"data": {"format": "karpathy", "root": str(tmp_path), "test": "gone.json"}}) == {}
    run = _run(tmp_path, "zs", f"method: {{name: zeroshot}}\ndata: {{root: {image_text_set}, test: test.json}}\n",
               {"metrics.json": {"test": {"t2i/R@1": 50.0, "t2i/R@5": 90.0}}})  # fmt: skip
    html = write_run_report([run], tmp_path / "r.html").read_text()
    assert "<td><i>chance</i></td>" in html and "<td class='num'>8.33</td>" in html


def test_environment_date_and_definitions(tmp_path: Path) -> None:
    path = _train(tmp_path, "coop", 0, 30.0)
    html = write_run_report([path], tmp_path / "r.html").read_text()
    assert ENV["git_sha"] in html and ENV["torch"] in html and "device" in html
    assert re.search(r"Written \d{4}-\d\d-\d\d \d\d:\d\d UTC", html)
    assert "recall at K" in html and "text → image retrieval" in html  # the page's metrics are defined
    assert "NDCG@K" not in html  # and only those


def test_glossary_picks_the_terms_used() -> None:
    html = glossary_html(["cls/top1", "seconds_adapt_per_sample"])
    assert "top-1 accuracy" in html and "per sample (ms)" in html and "recall at K" not in html
    assert fmt_number(6144) == "6,144" and fmt_number(81.4) == "81.4" and fmt_number(math.nan) == "–"


def test_continual_and_tta_runs(tmp_path: Path) -> None:
    continual = _run(tmp_path, "lpi", "method: {name: lpi}\n", {"continual.json": {
        "tasks": [{"name": "animal"}, {"name": "vehicle"}],
        "matrices": {"i2t/R@1": [[50.0, None], [45.0, 60.0]], "t2i/R@1": [[40.0, None], [38.0, 55.0]]},
        "summary": {"cl/i2t/R@1/final_average": 52.5, "cl/i2t/R@1/forgetting_max_minus_last": 5.0},
    }})  # fmt: skip
    zs = _run(tmp_path, "zs", "method: {name: tpt}\ndata: {test: sketch}\ntta: {steps: 0}\n",
              {"metrics.json": {"cls/top1": 40.0}})  # fmt: skip
    rlcf = _run(tmp_path, "rlcf", "method: {name: rlcf}\ndata: {test: sketch}\ntta: {steps: 3}\n",
                {"metrics.json": {"cls/top1": 46.0}})  # fmt: skip
    assert load_run(continual).kind == "continual" and load_run(rlcf).kind == "tta"
    out = tmp_path / "r.html"
    assert main(["report", str(continual), str(zs), str(rlcf), "--out", str(out)]) == 0
    html = out.read_text()
    assert "lpi: accuracy matrices" in html and html.count("<img") == 3  # two heatmaps and the TTA bars
    assert "test-time adaptation" in html and "52.50" in html and "<td class='num'>6.00</td>" in html


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="did the run finish"):
        load_run(tmp_path)
