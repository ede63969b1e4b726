"""The search service through FastAPI's TestClient: page, JSON API, thumbnails, bad queries, no path traversal."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient

from fastapi.testclient import TestClient  # noqa: E402

from vlprompt.cli.main import build_parser  # noqa: E402
from vlprompt.index.build import build_index  # noqa: E402
from vlprompt.index.search import SearchIndex  # noqa: E402
from vlprompt.index.service import MAX_QUERY_CHARS, create_app  # noqa: E402

TINY = {"pretrained": "world", "device": "cpu"}


@pytest.fixture(scope="module")
def index_dir(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("service") / "images"
    build_index(out, "vlprompt-tiny", str(small_world / "retrieval" / "test_clean.json"), **TINY)
    return out


@pytest.fixture(scope="module")
def index(index_dir: Path) -> SearchIndex:
    return SearchIndex(index_dir, device="cpu")


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> TestClient:
    return TestClient(create_app(index))


def _rows(page: str) -> list[int]:
    return [int(part.split('"', 1)[0]) for part in page.split('data-row="')[1:]]


def test_page_shows_ranked_thumbnails_with_scores(client: TestClient, index: SearchIndex) -> None:
    home = client.get("/")
    assert home.status_code == 200 and "Type a description" in home.text and "20 image items" in home.text
    page = client.get("/", params={"q": "a large red star", "k": "5"})
    assert page.status_code == 200
    expected = index.search("a large red star", 5)
    assert _rows(page.text) == [h.row for h in expected]
    assert f'src="/thumb/{expected[0].row}"' in page.text and f"{expected[0].score:.4f}" in page.text
    assert 'value="a large red star"' in page.text  # the query stays in the box
    for header in ("content-security-policy", "x-content-type-options", "x-frame-options"):
        assert header in page.headers


def test_thumbnails(client: TestClient, index: SearchIndex) -> None:
    response = client.get("/thumb/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    with Image.open(index.media_path(0)) as original:
        assert image.size == original.size  # 64 px world images are not enlarged (the page scales them)


def test_empty_and_long_queries_get_a_clear_message(client: TestClient) -> None:
    for q in ("", "   "):
        page = client.get("/", params={"q": q})
        assert page.status_code == 400 and "The query is empty" in page.text and "data-row" not in page.text
    long = "a red star " * 500
    page = client.get("/", params={"q": long})
    assert page.status_code == 400 and "The query is too long" in page.text and f"{MAX_QUERY_CHARS}" in page.text
    # under the limit but past the model's context: searched, with a note that the tail was ignored
    page = client.get("/", params={"q": "a red star " * 30})
    assert page.status_code == 200 and "the rest was ignored" in page.text and len(_rows(page.text)) == 10
    for k in ("0", "abc", "101"):
        page = client.get("/", params={"q": "a red star", "k": k})
        assert page.status_code == 400 and "number of results" in page.text
    assert client.get("/api/search", params={"q": ""}).json() == {
        "error": "The query is empty: type a few words describing what you are looking for."
    }
    assert client.get("/api/search", params={"q": "x" * 5000}).status_code == 400


def test_query_is_escaped(client: TestClient) -> None:
    page = client.get("/", params={"q": '<script>alert("x")</script>'})
    assert page.status_code == 200 and "<script>" not in page.text and "&lt;script&gt;" in page.text


def test_api_and_more_like_this(client: TestClient, index: SearchIndex) -> None:
    data = client.get("/api/search", params={"q": "two blue squares", "k": "3"}).json()
    assert [r["row"] for r in data["results"]] == [h.row for h in index.search("two blue squares", 3)]
    assert data["results"][0]["thumbnail"] == f"/thumb/{data['results'][0]['row']}"
    page = client.get("/", params={"like": "7", "k": "4"})
    assert page.status_code == 200 and _rows(page.text)[0] == 7 and "most similar to item 7" in page.text
    assert client.get("/", params={"like": "999"}).status_code == 400
    assert client.get("/healthz").json() == {"ok": True, "items": 20, "index": "flat"}


def test_no_path_traversal(client: TestClient, index_dir: Path, tmp_path: Path) -> None:
    for url in ("/thumb/..%2F..%2F..%2Fetc%2Fpasswd", "/thumb/../../etc/passwd", "/thumb/-1", "/thumb/20",
                "/thumb/%2Fetc%2Fpasswd", "/thumb/0.5", "/static/../manifest.json"):  # fmt: skip
        response = client.get(url)
        assert response.status_code == 404, url
        assert b"root:" not in response.content
    # an items file edited to point outside the media root is refused as well
    tampered = tmp_path / "tampered"
    shutil.copytree(index_dir, tampered)
    items = [json.loads(line) for line in (tampered / "items.jsonl").read_text().splitlines()]
    items[0]["path"] = "../" * 12 + "etc/passwd"
    items[1]["path"] = "/etc/passwd"
    (tampered / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    evil = TestClient(create_app(SearchIndex(tampered, encoder=False)))
    assert evil.get("/thumb/0").status_code == 404 and evil.get("/thumb/1").status_code == 404
    assert evil.get("/thumb/2").status_code == 200


def test_serve_binds_localhost_by_default() -> None:
    args = build_parser().parse_args(["serve", "some_index"])
    assert args.host == "127.0.0.1" and args.port == 8000
    from vlprompt.cli.serve_cmd import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("0.0.0.0")
