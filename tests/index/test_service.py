"""The search service through Starlette's TestClient: page, JSON API, thumbnails, bad queries, no path traversal."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("starlette")
pytest.importorskip("httpx")  # TestClient

from starlette.testclient import TestClient  # noqa: E402

from vlprompt.cli.main import build_parser  # noqa: E402
from vlprompt.index.search import SearchIndex  # noqa: E402
from vlprompt.index.service import MAX_QUERY_CHARS, create_app  # noqa: E402


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
    assert (args.max_queue, args.max_batch, args.threads) == (64, 32, None)
    from vlprompt.cli.serve_cmd import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("0.0.0.0")


def test_serve_refuses_a_bad_port_or_index(index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlprompt.cli.main import main

    assert main(["serve", str(index_dir), "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535, got 70000" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--device", "cpu"]) == 2  # refused before any server starts
    assert "not an index folder" in capsys.readouterr().err
    for flag in ("--max-queue", "--max-batch", "--threads"):
        assert main(["serve", str(index_dir), flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


# ---- issue 14: bad input gets a clear answer, never a 500 -----------------------------------------------
def test_numbers_in_the_address_are_ascii_digits(client: TestClient) -> None:
    from vlprompt.index.service import ascii_int

    assert [ascii_int(t) for t in ("0", "007", "19")] == [0, 7, 19]
    # int() takes all of these; str.isdigit() takes the superscript and the Arabic-Indic digit
    for text in ("²", "٣", "３", "+3", "-3", " 3", "3 ", "3_0", "0x3", "3.0", "", None, "1" * 10):
        assert ascii_int(text) is None, text
    assert client.get("/thumb/3").status_code == 200
    for row in ("²", "٣", "３", "+3", "3_0", "1" * 5000):
        response = client.get(f"/thumb/{row}")
        assert response.status_code == 404 and response.text == "no thumbnail for this item", row
    for params in ({"like": "٣"}, {"like": "²"}, {"like": "+3"}, {"like": "1" * 5000}, {"q": "a star", "k": "١٠"},
                   {"q": "a star", "k": "5_0"}, {"q": "a star", "k": " 5"}):  # fmt: skip
        page = client.get("/", params=params)
        assert page.status_code == 400 and 'class="message error"' in page.text, params
        assert "1" * 100 not in page.text  # the message does not repeat the number it refused
        assert "error" in client.get("/api/search", params=params).json()
    assert client.get("/api/search", params={"like": "3", "k": "2"}).json()["like"] == 3


def test_long_queries_are_refused_and_never_echoed_in_full(client: TestClient) -> None:
    from vlprompt.index.service import MAX_QUERY_BYTES

    page = client.get("/", params={"q": "y" * 5000})
    assert page.status_code == 400 and "The query is too long (5000 characters)" in page.text
    assert "y" * MAX_QUERY_CHARS in page.text and "y" * (MAX_QUERY_CHARS + 1) not in page.text  # the start only
    assert len(page.text) < 2 * MAX_QUERY_CHARS + 4000  # in the box, and no more than that in the title
    padded = client.get("/api/search", params={"q": " " * 2000 + "a red star"})  # spaces count: they are echoed
    assert padded.status_code == 400 and "too long (2010 characters)" in padded.json()["error"]
    like = client.get("/api/search", params={"q": "y" * 5000, "like": "3"})  # q is ignored, so not checked
    assert like.status_code == 200 and like.json()["query"] is None and "yyy" not in like.text
    # past MAX_QUERY_BYTES the request is refused before the query is even decoded
    huge = "z" * (MAX_QUERY_BYTES + 1)
    for url, kind in (("/", "text/html"), ("/api/search", "application/json"), ("/healthz", "text/plain")):
        response = client.get(url, params={"q": huge})
        assert response.status_code == 414 and response.headers["content-type"].startswith(kind), url
        assert "at most 1000 characters" in response.text and "z" * 50 not in response.text
        assert response.headers["connection"] == "close"
    # a query of MAX_QUERY_CHARS 4-byte characters, percent-encoded, is within MAX_QUERY_BYTES
    assert client.get("/api/search", params={"q": "😀" * MAX_QUERY_CHARS, "k": "1"}).status_code == 200


def test_request_bodies_are_refused(client: TestClient) -> None:
    from vlprompt.index.service import MAX_BODY_BYTES

    assert client.request("GET", "/healthz", content=b"x" * MAX_BODY_BYTES).status_code == 200
    for method, url in (("GET", "/healthz"), ("POST", "/"), ("POST", "/api/search")):
        response = client.request(method, url, content=b"x" * (MAX_BODY_BYTES + 1))
        assert response.status_code == 413 and "reads no request body" in response.text, (method, url)
    chunked = client.request("GET", "/healthz", content=iter([b"x"]))  # a generator body goes chunked
    assert chunked.status_code == 413


def _mirror_media(index: SearchIndex, dest: Path) -> Path:
    """A copy of the index's media files under ``dest`` (same relative paths)."""
    for item in index.items:
        target = dest / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(index.media_root) / item["path"], target)
    return dest


def test_symlinks_out_of_the_media_root_are_not_served(index: SearchIndex, index_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(outside / "secret.png")
    media = _mirror_media(index, tmp_path / "media")
    rel = [Path(it["path"]) for it in index.items]
    (media / rel[0]).unlink()
    (media / rel[0]).symlink_to(outside / "secret.png")  # a file leading out
    (media / rel[1]).unlink()
    (media / rel[1]).symlink_to(media / rel[2])  # a link that stays inside is fine
    (media / "away").symlink_to(outside, target_is_directory=True)  # a folder leading out
    items = [json.loads(line) for line in (index_dir / "items.jsonl").read_text().splitlines()]
    items[3]["path"] = "away/secret.png"
    tampered = tmp_path / "tampered"
    shutil.copytree(index_dir, tampered)
    (tampered / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    guarded = SearchIndex(tampered, encoder=False, media_root=media)
    assert guarded.media_path(0) is None and guarded.media_path(3) is None
    assert guarded.media_path(1) == (media / rel[2]).resolve() and guarded.media_path(4) == (media / rel[4]).resolve()
    app = TestClient(create_app(guarded))
    assert [app.get(f"/thumb/{row}").status_code for row in range(5)] == [404, 200, 200, 404, 200]
    # the media root itself may be reached through a symlink: real paths are compared on both sides
    (tmp_path / "link_to_media").symlink_to(media, target_is_directory=True)
    linked = SearchIndex(tampered, encoder=False, media_root=tmp_path / "link_to_media")
    assert linked.media_path(2) == (media / rel[2]).resolve() and linked.media_path(0) is None
    # a video stored as a folder of frames must not hold a frame leading out either
    frames = media / "frames"
    frames.mkdir()
    shutil.copy(media / rel[2], frames / "000.png")
    guarded.items[5] = {**guarded.items[5], "path": "frames"}
    assert guarded.media_path(5) == frames.resolve()
    (frames / "001.png").symlink_to(outside / "secret.png")
    assert guarded.media_path(5) is None


def _damage(shard: Path, how: str) -> None:
    """Damage a cache shard the way a disk, a copy or a person would (no pickle is written)."""
    import numpy as np

    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "missing":
        shard.unlink()
    elif how == "float16":
        np.save(shard, np.load(shard).astype(np.float16))
    elif how == "object":  # an object-dtype header: loading it would need pickles
        with open(shard, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (20, 128)})
            f.write(b"\x80\x04N." * 20)


@pytest.mark.parametrize("how", ["truncated", "missing", "object", "float16"])
def test_a_damaged_cache_is_refused_when_the_index_opens(
    index_dir: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlprompt.cli.main import main
    from vlprompt.errors import DataError

    damaged = tmp_path / "damaged"
    shutil.copytree(index_dir, damaged)
    _damage(damaged / "cache" / "image" / "shard_00000.npy", how)
    with pytest.raises(DataError, match="shard_00000.npy (is missing or damaged|holds float16)") as err:
        SearchIndex(damaged, encoder=False)
    assert "the same `vlprompt index build` again" in str(err.value)
    assert main(["search", str(damaged), "a red star", "--device", "cpu"]) == 2
    assert "shard_00000.npy" in capsys.readouterr().err
    assert main(["index", "info", str(damaged), "--json"]) == 2  # described, then reported
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["items"] == 20 and "shard_00000.npy" in out.err


def test_index_info_verify_compares_checksums(
    index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from vlprompt.cli.main import main

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    assert main(["index", "info", str(copy), "--verify"]) == 0
    shard = copy / "cache" / "image" / "shard_00000.npy"
    data = np.load(shard)
    data[3, 7] += 0.5  # same dtype and shape: only the checksum can tell
    np.save(shard, data)
    assert main(["index", "info", str(copy)]) == 0
    assert main(["index", "info", str(copy), "--verify"]) == 2
    assert "corrupt (sha256 differs)" in capsys.readouterr().err


def test_damaged_items_and_manifest_are_refused(index_dir: Path, tmp_path: Path) -> None:
    from vlprompt.errors import DataError

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    lines = (copy / "items.jsonl").read_text().splitlines()
    for bad, match in (({"cache_row": 99}, "inconsistent"), ({"part": "video"}, "inconsistent"),
                       ({"cache_row": "0"}, "inconsistent"), ({"kind": None}, "not an item")):  # fmt: skip
        (copy / "items.jsonl").write_text("\n".join([json.dumps({**json.loads(lines[0]), **bad}), *lines[1:]]))
        with pytest.raises(DataError, match=match):
            SearchIndex(copy, encoder=False)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    del manifest["caches"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="damaged.*caches"):
        SearchIndex(copy, encoder=False)


def test_a_data_error_while_serving_is_a_503(index: SearchIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprompt.errors import DataError

    app = TestClient(create_app(index))

    search_batch = index.search_batch

    def damaged(queries: list, k: object) -> object:  # item 3's cache row cannot be read
        if 3 in queries:
            raise DataError("feature cache /secret/place/cache/image: shard_00000.npy is missing or damaged")
        return search_batch(queries, k)

    monkeypatch.setattr(index, "search_batch", damaged)
    for url in ("/", "/api/search"):
        response = app.get(url, params={"like": "3"})
        assert response.status_code == 503 and "damaged" in response.text and "/secret/place" not in response.text
    assert app.get("/", params={"q": "a red star"}).status_code == 200  # other queries still answered


def test_search_parameters_must_fit_the_index_kind(
    index_dir: Path, small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlprompt.cli.main import main
    from vlprompt.errors import ConfigError
    from vlprompt.index.build import build_index

    for flags, message in ((["--nprobe", "3"], "nprobe is a search parameter of ivfpq indexes; this index is flat"),
                           (["--ef-search", "64"], "ef_search is a search parameter of hnsw indexes")):  # fmt: skip
        assert main(["search", str(index_dir), "a red star", "--device", "cpu", *flags]) == 2  # was a faiss error
        assert message in capsys.readouterr().err
    hnsw = tmp_path / "hnsw"
    shutil.copytree(index_dir, hnsw)  # the embeddings are reused: only the FAISS index is built
    build_index(hnsw, "vlprompt-tiny", str(small_world / "retrieval" / "test_clean.json"), pretrained="world",
                device="cpu", kind="hnsw")  # fmt: skip
    assert SearchIndex(hnsw, encoder=False, ef_search=16).ef_search == 16
    with pytest.raises(ConfigError, match="ef_search must be at least 1, got -5"):
        SearchIndex(hnsw, encoder=False, ef_search=-5)
