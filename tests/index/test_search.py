"""Search: exact search equals brute-force similarity, approximate kinds agree with it, media queries, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.cli.main import main
from vlprompt.errors import ConfigError, DataError
from vlprompt.index.build import build_index
from vlprompt.index.search import SearchIndex, benchmark, exact_top_k, index_queries, recall_with_ties
from vlprompt.index.sources import load_model

pytest.importorskip("faiss")

TINY = {"pretrained": "world", "device": "cpu"}  # the shipped tiny CLIP: well-separated scores


@pytest.fixture(scope="module")
def image_index(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "images"
    build_index(out, "vlprompt-tiny", str(small_world / "retrieval" / "test_clean.json"), **TINY)
    return out


@pytest.fixture(scope="module")
def caption_index(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Captions of the small world's base split (200), enough to train a small IVF-PQ."""
    out = tmp_path_factory.mktemp("index") / "captions"
    build_index(out, "vlprompt-tiny", str(small_world / "retrieval" / "base_train.json"), modality="text", **TINY)
    return out


def test_exact_search_matches_brute_force(image_index: Path, small_world: Path) -> None:
    index = SearchIndex(image_index, device="cpu")
    records = json.loads((small_world / "retrieval" / "test_clean.json").read_text())
    queries = [c for r in records for c in r["caption"][:2]]
    # the reference: a separately loaded encoder, every gallery image encoded afresh, full similarity matrix
    method = load_model(index.manifest["model"], "cpu")
    with torch.no_grad():
        images = torch.stack(
            [method.backbone.preprocess_val(Image.open(small_world / r["image"]).convert("RGB")) for r in records]
        )
        gallery = method.encode_image(images).numpy()
        q = method.encode_text(queries).numpy()
    sims = q @ gallery.T
    k = 7
    scores, rows = index.search_vectors(index.encode_text(queries), k)
    reference = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    sorted_sims = np.sort(sims, axis=1)[:, ::-1]
    assert (np.abs(np.diff(sorted_sims[:, : k + 1], axis=1)) > 1e-6).all()  # no near-ties: order is well defined
    np.testing.assert_array_equal(rows, reference)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, reference, axis=1), atol=1e-5)
    # the one-query path gives the same hits, ranked from 1
    hits = index.search(queries[3], k)
    assert [h.row for h in hits] == reference[3].tolist() and [h.rank for h in hits] == list(range(1, k + 1))
    assert hits[0].item["id"] == records[reference[3, 0]]["image"]
    # k larger than the gallery returns the whole gallery
    assert len(index.search(queries[0], 1000)) == len(records)


def test_ties_are_ordered_by_row(image_index: Path) -> None:
    index = SearchIndex(image_index, encoder=False)
    vectors = index.vectors()
    index.index.add(vectors[:3])  # rows 20..22 duplicate rows 0..2: equal scores
    index.items += index.items[:3]
    scores, rows = index.search_vectors(vectors[1:2], 4)
    assert rows[0, :2].tolist() == [1, len(vectors) + 1]
    np.testing.assert_array_equal(exact_top_k(index.vectors(), vectors[1:2], 2), rows[:, :2])
    # agreement with exact search counts either of two equal-scoring rows as right, any lower row as wrong
    all_vectors = index.vectors()
    assert recall_with_ties(all_vectors, vectors[1:2], np.array([[len(vectors) + 1]])).tolist() == [1.0]
    worst = int(np.argmin(all_vectors @ vectors[1]))
    assert recall_with_ties(all_vectors, vectors[1:2], np.array([[1, worst]])).tolist() == [0.5]


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_agree_with_exact(caption_index: Path, small_world: Path, tmp_path: Path, kind: str) -> None:
    params = {"nbits": 6, "nlist": 4} if kind == "ivfpq" else None
    out = tmp_path / kind
    annotation = str(small_world / "retrieval" / "base_train.json")
    build_index(out, "vlprompt-tiny", annotation, modality="text", kind=kind, params=params, **TINY)
    exact = SearchIndex(caption_index, device="cpu")
    approx = SearchIndex(out, encoder=exact.method)
    queries = exact.encode_text(["a red star", "two blue squares", "a green letter h above a yellow digit 2"])
    _, exact_rows = exact.search_vectors(queries, 10)
    scores, rows = approx.search_vectors(queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact_rows.tolist())])
    assert overlap >= 0.8
    # whatever the kind, the scores shown are exact cosine similarities of the returned rows
    vectors = approx.vectors()
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[rows]), atol=1e-5)
    result = benchmark(approx, index_queries(approx, 30), k=10)
    assert result["queries"] == 30 and 0.8 <= result["agreement@10"] <= 1.0 and result["query_ms/p50"] > 0


def test_media_and_like_queries(image_index: Path, small_world: Path, tmp_path: Path) -> None:
    index = SearchIndex(image_index, device="cpu")
    hit = index.search_media(index.media_path(4), 3)[0]
    assert hit.row == 4 and hit.score == pytest.approx(1.0, abs=1e-4)  # an item finds itself first
    like = index.search_like(4, 3)
    assert like[0].row == 4 and [h.row for h in like] == [h.row for h in index.search_media(index.media_path(4), 3)]
    with pytest.raises(DataError, match="no item 99"):
        index.search_like(99)
    csv = small_world / "video" / "MSRVTT_JSFUSION_test.csv"
    build_index(tmp_path / "vid", "vlprompt-tiny", str(csv), fmt="msrvtt", num_frames=4, **TINY)
    videos = SearchIndex(tmp_path / "vid", encoder=index.method)
    top = videos.search_media(videos.media_path(2), 2)[0]
    assert top.row == 2 and top.score == pytest.approx(1.0, abs=1e-4)


def test_media_paths_stay_inside_the_media_root(image_index: Path, tmp_path: Path) -> None:
    index = SearchIndex(image_index, encoder=False)
    assert index.media_path(0).is_file() and index.media_path(-1) is None and index.media_path(len(index)) is None
    for bad in ("../../../etc/passwd", "/etc/passwd", "a/../../x.png", "..\\x.png", ""):
        index.items[0] = {**index.items[0], "path": bad}
        assert index.media_path(0) is None, bad
    moved = SearchIndex(image_index, encoder=False, media_root=tmp_path)
    assert moved.media_path(1) == tmp_path / index.items[1]["path"]


def test_damaged_and_unfinished_indexes(image_index: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an index folder"):
        SearchIndex(tmp_path, encoder=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "index.faiss"):
        (broken / name).write_bytes((image_index / name).read_bytes())
    (broken / "items.jsonl").write_text((image_index / "items.jsonl").read_text().split("\n", 1)[1])
    with pytest.raises(DataError, match="inconsistent"):
        SearchIndex(broken, encoder=False)


def test_search_cli(image_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(image_index), "a red star moving left", "-k", "3", "--json", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in lines] == [1, 2, 3] and lines[0]["score"] >= lines[1]["score"] >= lines[2]["score"]
    assert {"row", "id", "path", "captions"} <= set(lines[0]) and "cache_row" not in lines[0]
    assert main(["search", str(image_index), "a red star", "-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "reads only the first" not in out
    assert main(["search", str(image_index), "a red star " * 40, "-k", "2", "--device", "cpu"]) == 0
    assert "note: the model reads only the first" in capsys.readouterr().out  # a query longer than the context
    assert main(["search", str(image_index)]) == 2
    assert "give a text query or --media" in capsys.readouterr().err
    assert main(["search", str(image_index), "   "]) == 2
    assert main(["index", "info", str(image_index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["items"] == 20 and info["index"] == "flat"


def test_index_build_cli(small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = str(small_world / "retrieval" / "test_clean.json")
    argv = ["index", "build", "--model", "vlprompt-tiny", "--pretrained", "none", "--data", ann, "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "idx"), "--kind", "hnsw", "--ef-search", "50", "--quiet"]) == 0
    assert "20 image items x 128, hnsw index" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["index"]["params"]["ef_search"] == 50
    assert main([*argv, "--out", str(tmp_path / "pq"), "--kind", "ivfpq"]) == 2
    assert "ivfpq needs at least 256 items" in capsys.readouterr().err
    assert main(["index", "bench", str(tmp_path / "idx"), "-k", "5", "--queries", "8", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bench["queries"] == 8 and bench["agreement@5"] == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        from vlprompt.index.sources import model_spec

        model_spec("ViT-B-32")
