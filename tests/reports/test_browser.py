"""The HTML reports in a real browser (headless Chromium, Playwright): they render, fit a 1200 px window, every plot
decodes to a picture with something drawn on it, and the page is not mostly blank.

The same checks run on a deliberately broken page first, so a check that cannot fail would show.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from headless_chromium import CHROMIUM, launch

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from vlprompt.demo import Row, report  # noqa: E402
from vlprompt.reports.pages import heatmap  # noqa: E402
from vlprompt.reports.runs import write_run_report  # noqa: E402

WIDTH = 1200


def _run(root: Path, name: str, config: str, results: dict[str, Any]) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    file = "continual.json" if "matrices" in results else "metrics.json"
    (path / file).write_text(json.dumps(results))
    (path / "env.json").write_text(json.dumps({"vlprompt": "0.1.0", "git_sha": "abc", "torch": "2", "seed": 0}))
    return path


def _run_report(root: Path, data: Path) -> Path:
    """Seeds of a trained method with many metrics, TTA in both directions with their 0-step runs, a continual run."""
    runs = []
    cfg = f"data: {{format: karpathy, root: {data}, train: train.json, test: test.json}}\n"
    for seed, r1 in enumerate((30.0, 32.0, 34.0)):
        test = {f"{d}/{m}": r1 + i for d in ("t2i", "i2t") for i, m in enumerate(("R@1", "R@5", "R@10", "MdR", "MnR"))}
        runs.append(_run(root, f"coop_{seed}", f"method: {{name: coop}}\nseed: {seed}\n{cfg}",
                         {"test": test | {"rsum": 200.0}, "params": {"trainable": 6144}}))  # fmt: skip
    for direction in ("i2t", "t2i"):
        for steps, r1 in ((0, 18.0), (8, 22.0)):
            config = f"method: {{name: rlcf_retrieval, direction: {direction}}}\n{cfg}tta: {{steps: {steps}}}\n"
            metrics = {f"{direction}/R@1": r1, f"{direction}/R@5": r1 + 20, "samples": 24, "seconds_total": 3.0,
                       "seconds_setup": 1.0, "seconds_adapt_per_sample": 0.08}  # fmt: skip
            runs.append(_run(root, f"tta_{direction}_{steps}", config, metrics))
    runs.append(_run(root, "lpi", f"method: {{name: lpi}}\n{cfg}", {
        "tasks": [{"name": "a"}, {"name": "b"}], "summary": {"cl/i2t/R@1/last": 50.0},
        "matrices": {"i2t/R@1": [[50.0, None], [45.0, 60.0]], "t2i/R@1": [[40.0, None], [38.0, 55.0]]}}))  # fmt: skip
    return write_run_report(runs, root / "report.html", "runs")


def _demo_report(root: Path) -> Path:
    keys = ("t2i/R@1", "t2i/R@5", "t2i/R@10", "i2t/R@1", "i2t/R@5", "i2t/R@10")
    chance = {"chance": {k: 0.3 for k in keys}}
    rows = [Row("retrieval under domain shift", m, "sketch", {k: v + i for i, k in enumerate(keys)}, t, 9.0, chance)
            for m, t, v in (("zero-shot", 0, 20.5), ("CoOp", 512, 22.3), ("VPT-deep", 6144, 30.1))]  # fmt: skip
    matrix = heatmap([[50.0, math.nan], [45.0, 60.0]], ["after a", "after b"], ["a", "b"], "R@1")
    rows += [Row("continual retrieval (world, 6 tasks)", m, "world", {"i2t/R@1": v, "i2t forget": 2.0}, 10, 5.0,
                 {"figures": [(m, matrix)]}) for m, v in (("zero-shot", 30.0), ("LPI", 45.0))]  # fmt: skip
    rows += [Row("test-time adaptation: retrieval (t2i)", m, "sketch", {"t2i/R@1": v, "ms/sample": 80.0}, 0, 2.0,
                 {"chance": {"t2i/R@1": 1.0}}) for m, v in (("zero-shot", 10.0), ("RLCF", 12.0))]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    return report(rows, root, seconds=60.0)


def _broken_page(root: Path) -> Path:
    """What the checks must catch: an image that does not decode, a table wider than the window, a blank page."""
    path = root / "broken.html"
    wide = "<table><tr>" + "<td>0123456789</td>" * 60 + "</tr></table>"
    path.write_text(f"<!doctype html><html><body><h1>x</h1><img class='plot' src='data:image/png;base64,AAAA'/>"
                    f"{wide}<div style='height:4000px'></div></body></html>")  # fmt: skip
    return path


def _blank_share(png: bytes) -> float:
    """Share of pixel rows of a screenshot that are one flat colour (nothing drawn on them)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float((pixels.std(axis=1) < 1.0).mean())


def problems(page: Any, url: str, headings: list[str]) -> list[str]:
    """Everything wrong with the page at ``url`` as a person at a 1200 px window would see it."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"script error: {e}"))
    page.goto(url)
    found: list[str] = []
    if not page.locator("h1").count():
        found.append("no title")
    shown = page.locator("h2").all_inner_texts()
    found += [f"no section {h!r}" for h in headings if h not in shown]
    scroll = page.evaluate("document.documentElement.scrollWidth")
    if scroll > WIDTH:
        found.append(f"horizontal scrolling: the page is {scroll} px wide")
    images = page.locator("img")
    if not images.count():
        found.append("no plot")
    for i in range(images.count()):
        image = images.nth(i)
        natural = image.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
        box = image.bounding_box()
        if not natural[0] or natural[1] == 0 or not box or box["width"] < 100 or box["height"] < 50:
            found.append(f"plot {i} is broken or tiny: {natural}, {box}")
            continue
        pixels = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("L"), dtype=np.float64)
        if pixels.std() < 10 or (pixels < 200).mean() < 0.02:  # a plot has axes, bars, text: dark pixels, contrast
            found.append(f"plot {i} is empty (pixel std {pixels.std():.1f})")
    for i, table in enumerate(page.locator("table").all()):
        box = table.bounding_box()
        if not box or box["height"] < 20 or box["x"] + box["width"] > WIDTH:
            found.append(f"table {i} is empty or too wide: {box}")
    blank = _blank_share(page.screenshot(full_page=True))
    if blank > 0.6:
        found.append(f"{blank:.0%} of the page is blank")
    return found + errors


@pytest.fixture()
def page(tmp_path: Path):
    with sync_api.sync_playwright() as p:
        browser = launch(p, tmp_path / "profile", viewport={"width": WIDTH, "height": 900})
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


def test_the_checks_catch_a_broken_page(page: Any, tmp_path: Path) -> None:
    found = problems(page, _broken_page(tmp_path).as_uri(), ["results"])
    assert any("no section" in f for f in found) and any("horizontal scrolling" in f for f in found)
    assert any("broken" in f for f in found) and any("blank" in f for f in found)


def test_run_report_renders(page: Any, tmp_path: Path, image_text_set: Path) -> None:
    path = _run_report(tmp_path / "runs", image_text_set)
    headings = ["runs", "results: trained runs", "results: test-time adaptation runs",
                "test-time adaptation against the 0-step baseline", "recall@K", "environment",
                "what the numbers mean"]  # fmt: skip
    assert problems(page, path.as_uri(), headings) == []
    assert page.locator("table").count() >= 6 and page.locator("img").count() == 4  # TTA, recall@K, 2 heatmaps
    assert "chance" in page.inner_text("body")


def test_demo_report_renders(page: Any, tmp_path: Path) -> None:
    path = _demo_report(tmp_path / "demo")
    headings = ["retrieval under domain shift", "continual retrieval (world, 6 tasks)",
                "test-time adaptation: retrieval (t2i)", "environment", "what the numbers mean"]  # fmt: skip
    assert problems(page, path.as_uri(), headings) == []
    assert page.locator("img").count() == 5  # one figure of bars per section and the two heatmaps
