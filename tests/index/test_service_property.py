"""Property: whatever a request holds (route, parameters, numbers in any script, paths, methods, bodies), the
search service answers 2xx or 4xx with a message, never 500, and never bytes from outside its index, even with
symlinks and items that lead out of the media root (Hypothesis, a bounded number of examples)."""

from __future__ import annotations

import html
import io
import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("faiss")
pytest.importorskip("starlette")
pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from vlprompt.index.search import SearchIndex  # noqa: E402
from vlprompt.index.service import MAX_QUERY_CHARS, create_app, render_thumbnail  # noqa: E402

SECRET = b"VLPROMPT-SECRET-7f3a9c"


@pytest.fixture(scope="module")
def guarded(index: Any, index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The index served with a media root that holds ways out: a symlinked file, a symlinked folder, and items
    whose paths climb out or are absolute. Returns the client and the bytes that must never come back."""
    tmp = tmp_path_factory.mktemp("guarded")
    outside = tmp / "outside"
    outside.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", SECRET.decode())
    Image.new("RGB", (48, 48), (250, 0, 250)).save(outside / "secret.png", pnginfo=info)
    (outside / "secret.txt").write_bytes(SECRET)
    media = tmp / "media"
    for item in index.items:
        (media / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(index.media_root) / item["path"], media / item["path"])
    (media / index.items[0]["path"]).unlink()
    (media / index.items[0]["path"]).symlink_to(outside / "secret.png")
    (media / "away").symlink_to(outside, target_is_directory=True)
    items = [json.loads(line) for line in (index_dir / "items.jsonl").read_text().splitlines()]
    ways_out = ["away/secret.png", "../outside/secret.png", str(outside / "secret.png"), "away", "away/secret.txt"]
    for row, path in enumerate(ways_out, start=1):
        items[row]["path"] = path
    served = tmp / "index"
    shutil.copytree(index_dir, served)
    (served / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    guarded = SearchIndex(served, encoder=index.method, media_root=media)
    secret_png = (outside / "secret.png").read_bytes()
    forbidden = [SECRET, secret_png, render_thumbnail(outside / "secret.png", "image")]  # as raw file or thumbnail
    client = TestClient(create_app(guarded), raise_server_exceptions=False)
    legit = [row for row in range(len(guarded)) if row > len(ways_out)]
    assert client.get(f"/thumb/{legit[0]}").status_code == 200  # the fixture serves what it should
    return {"client": client, "forbidden": forbidden, "ways_out": range(len(ways_out) + 1), "n": len(guarded)}


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # any Unicode a URL can carry
numbers = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(["²", "٣", "３", "+3", "3_0", " 7", "0x3", "1e2", "", "1" * 30, "007", "99999999999"]),
    text,
)
words = st.lists(st.sampled_from(["a", "red", "large", "star", "two", "blue", "squares", "the"]), max_size=6)
queries = st.one_of(words.map(" ".join), text, st.text(max_size=3).map(lambda s: s * 400))  # up to 1200 chars
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def check(guarded: dict[str, Any], response: Any, method: str = "GET") -> None:
    """2xx, or 4xx with a message; no byte from outside the index; a thumbnail only of an item inside it."""
    assert 200 <= response.status_code < 300 or 400 <= response.status_code < 500, response.text[:300]
    if response.status_code >= 400 and method != "HEAD":
        assert response.text.strip(), "a refusal says why"
    for secret in guarded["forbidden"]:
        assert secret not in response.content
    path = response.request.url.path
    if path.startswith("/thumb/") and response.status_code == 200:
        row = int(path.removeprefix("/thumb/"))
        assert 0 <= row < guarded["n"] and row not in guarded["ways_out"]
        assert response.headers["content-type"] == "image/jpeg"
        if method == "HEAD":  # the GET's head, no body
            assert response.content == b""
        else:
            Image.open(io.BytesIO(response.content)).verify()


@SETTINGS
@given(
    route=st.sampled_from(["/", "/api/search"]),
    query=st.fixed_dictionaries({}, optional={"q": queries, "k": numbers, "like": numbers}),
)
def test_any_query_gets_results_or_a_message(guarded: dict[str, Any], route: str, query: dict[str, str]) -> None:
    response = guarded["client"].get(route, params=query)
    check(guarded, response)
    if route == "/api/search" and response.status_code != 200:
        assert response.json()["error"]
    q = query.get("q", "")
    if len(q) > MAX_QUERY_CHARS:  # the page shows at most MAX_QUERY_CHARS of a query, the API none of it
        assert html.escape(q[: MAX_QUERY_CHARS + 1], quote=True) not in response.text


@SETTINGS
@given(
    method=st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "OPTIONS"]),
    route=st.one_of(
        st.sampled_from(["/", "/api/search", "/healthz", "/favicon.ico", "/thumb/"]),
        numbers.map(lambda r: "/thumb/" + quote(r, safe="")),
        text.map(lambda t: "/thumb/" + quote(t, safe="/")),  # slashes too: ../ and absolute-looking paths
        text.map(lambda t: "/" + quote(t, safe="/")),
    ),
    query=st.dictionaries(st.sampled_from(["q", "k", "like", "x", ""]), st.one_of(numbers, queries), max_size=3),
    body=st.one_of(st.just(b""), st.binary(max_size=64), st.just(b"z" * 5000)),
)
def test_any_request_gets_a_clear_answer_and_nothing_from_outside(
    guarded: dict[str, Any], method: str, route: str, query: dict[str, str], body: bytes
) -> None:
    check(guarded, guarded["client"].request(method, route, params=query, content=body or None), method)


def test_every_way_out_is_refused(guarded: dict[str, Any]) -> None:
    """The rows the property relies on Hypothesis to find, checked one by one."""
    for row in guarded["ways_out"]:
        response = guarded["client"].get(f"/thumb/{row}")
        assert response.status_code == 404 and not any(s in response.content for s in guarded["forbidden"]), row
