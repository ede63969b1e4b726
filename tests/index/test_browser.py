"""End to end in a real browser: headless Chromium (Debian's package) driven by Playwright against a live server.

The test starts the service itself (uvicorn in a thread, on a free port of 127.0.0.1) over an index of a folder
holding images and videos, then types queries the way a person would.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from headless_chromium import CHROMIUM, launch

pytest.importorskip("faiss")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from vlprompt.index.build import build_index  # noqa: E402
from vlprompt.index.search import SearchIndex  # noqa: E402
from vlprompt.index.service import create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("browser")
    media = tmp / "media"
    media.mkdir()
    for path in sorted((small_world / "images" / "clean").glob("ret_test_*.png"))[:12]:
        shutil.copy(path, media / path.name)
    for path in sorted((small_world / "video" / "videos").glob("*.mp4"))[:2]:
        shutil.copy(path, media / path.name)
    build_index(tmp / "index", "vlprompt-tiny", str(media), pretrained="world", device="cpu", num_frames=4)
    app = create_app(SearchIndex(tmp / "index", device="cpu"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server takes over this socket: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _loaded_image_sizes(page, timeout: float = 20.0) -> list[list[int]]:
    """Natural sizes of the result thumbnails once all have loaded (polled: the page's CSP forbids eval)."""
    deadline = time.monotonic() + timeout
    while True:
        state = page.eval_on_selector_all(
            ".result img", "els => els.map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        if all(done for done, _, _ in state) or time.monotonic() > deadline:
            return [[w, h] for _, w, h in state]
        time.sleep(0.05)


def test_search_page_in_headless_chromium(server: str, tmp_path: Path) -> None:
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = launch(p, tmp_path / "profile")
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            # 4xx pages for refused queries are expected; anything else in the console is a bug
            page.on("console", lambda m: m.type == "error" and "status of 400" not in m.text and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            assert "Type a description" in page.inner_text(".message")

            # a query with every item shown: images as thumbnails, videos as strips of frames, scores descending
            page.fill("input[name=q]", "a large red star")
            page.select_option("select[name=k]", "20")
            page.press("input[name=q]", "Enter")
            page.wait_for_selector(".result")
            assert page.locator(".result").count() == 14
            sizes = _loaded_image_sizes(page)
            assert len(sizes) == 14 and all(w > 0 and h > 0 for w, h in sizes)  # every thumbnail decoded
            strips = page.eval_on_selector_all(
                ".result.video img", "els => els.map(i => i.naturalWidth / i.naturalHeight)"
            )
            assert len(strips) == 2 and all(ratio >= 3 for ratio in strips)  # several frames side by side
            scores = [float(s) for s in page.locator(".result .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)
            assert page.input_value("input[name=q]") == "a large red star"

            # an empty query: a clear message, no results, the page still works
            page.fill("input[name=q]", "")
            page.press("input[name=q]", "Enter")
            page.wait_for_selector(".message.error")
            assert "The query is empty" in page.inner_text(".message.error")
            assert page.locator(".result").count() == 0

            # a very long query: a clear message instead of a crash
            page.fill("input[name=q]", "a small green circle next to a blue square " * 100)
            page.press("input[name=q]", "Enter")
            page.wait_for_selector(".message.error")
            assert "The query is too long" in page.inner_text(".message.error")

            # and searching goes on normally afterwards, including "more like this"
            page.fill("input[name=q]", "a blue square")
            page.select_option("select[name=k]", "5")
            page.press("input[name=q]", "Enter")
            page.wait_for_selector(".result")
            assert page.locator(".result").count() == 5
            row = page.get_attribute(".result >> nth=1", "data-row")
            page.click(".result >> nth=1 >> text=more like this")
            page.wait_for_selector(".result")
            assert page.get_attribute(".result >> nth=0", "data-row") == row
        finally:
            browser.close()
    assert not errors, errors
