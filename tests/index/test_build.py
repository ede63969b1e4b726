"""Index build: manifest and items, resume after a crash, reuse of embeddings, data and model resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data.features import FeatureCache
from vlprompt.errors import ConfigError, DataError
from vlprompt.index.build import build_index, index_params
from vlprompt.index.search import SearchIndex
from vlprompt.methods.base import Method

pytest.importorskip("faiss")

TINY = {"pretrained": "none", "device": "cpu"}


def _annotation(world: Path) -> Path:
    return world / "retrieval" / "test_clean.json"


def test_build_writes_manifest_items_and_index(small_world: Path, tmp_path: Path) -> None:
    manifest = build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), **TINY)
    records = json.loads(_annotation(small_world).read_text())
    assert manifest["count"] == len(records) and manifest["kinds"] == ["image"] and manifest["dim"] == 128
    assert manifest["index"]["kind"] == "flat" and manifest["data"]["root"] == str(small_world)
    items = [json.loads(line) for line in (tmp_path / "idx" / "items.jsonl").read_text().splitlines()]
    assert [it["id"] for it in items] == [r["image"] for r in records]  # content ids: paths under the data root
    assert items[0]["captions"] == records[0]["caption"]
    media_root = Path(manifest["media_root"])
    assert all((media_root / it["path"]).is_file() and not Path(it["path"]).is_absolute() for it in items)
    cache = FeatureCache(tmp_path / "idx" / "cache" / "image")
    assert len(cache) == len(records) and cache.meta["dtype"] == "float32"
    norms = np.linalg.norm(cache.load_all(), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # cosine similarity = inner product


def test_crash_mid_extraction_loses_at_most_one_shard(
    small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Method.encode_image
    encoded: list[int] = []

    def crashing(self, images, plans=None):
        if sum(encoded) >= 10:  # rows 0..9 done: shards 0 and 1 (of 4 rows) written, shard 2 half-way
            raise KeyboardInterrupt("simulated crash")
        encoded.append(len(images))
        return original(self, images, plans)

    kwargs = dict(batch_size=2, shard_size=4, **TINY)
    monkeypatch.setattr(Method, "encode_image", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), **kwargs)
    meta = json.loads((tmp_path / "idx" / "cache" / "image" / "meta.json").read_text())
    assert sorted(meta["shards"], key=int) == ["0", "1"]  # only the shard in progress (rows 8..11) is lost
    assert not (tmp_path / "idx" / "manifest.json").exists()
    with pytest.raises(DataError, match="unfinished index"):
        SearchIndex(tmp_path / "idx", encoder=False)

    encoded.clear()
    monkeypatch.setattr(Method, "encode_image", lambda self, im, plans=None: encoded.append(len(im)) or original(
        self, im, plans))  # fmt: skip
    resumed = build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), **kwargs)
    assert sum(encoded) == resumed["count"] - 8  # everything but the two finished shards, once
    fresh = build_index(tmp_path / "fresh", "vlprompt-tiny", str(_annotation(small_world)), **kwargs)
    a, b = SearchIndex(tmp_path / "idx", encoder=False), SearchIndex(tmp_path / "fresh", encoder=False)
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=1e-6)
    assert a.items == b.items and fresh["count"] == resumed["count"]


def test_another_index_kind_reuses_the_embeddings(
    small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), **TINY)

    def must_not_encode(*args, **kwargs):
        raise AssertionError("the cached embeddings should have been reused")

    monkeypatch.setattr(Method, "encode_image", must_not_encode)
    manifest = build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), kind="hnsw", **TINY)
    assert manifest["index"]["kind"] == "hnsw" and manifest["index"]["params"]["M"] == 32
    # another model in the same folder is refused rather than mixed in
    with pytest.raises(DataError, match="encoder"):
        build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), pretrained="world")


def test_text_and_video_indexes(small_world: Path, tmp_path: Path) -> None:
    text = build_index(tmp_path / "txt", "vlprompt-tiny", str(_annotation(small_world)), modality="text", **TINY)
    records = json.loads(_annotation(small_world).read_text())
    unique = {(r["image"], c) for r in records for c in r["caption"]}
    assert text["count"] == len(unique) and text["kinds"] == ["text"]
    item = json.loads((tmp_path / "txt" / "items.jsonl").read_text().splitlines()[0])
    assert item["text"] == records[0]["caption"][0] and item["visual"] == "image" and item["path"]

    csv = small_world / "video" / "MSRVTT_JSFUSION_test.csv"
    video = build_index(tmp_path / "vid", "vlprompt-tiny", str(csv), fmt="msrvtt", num_frames=4, **TINY)
    n_videos = len({line.split(",")[2] for line in csv.read_text().splitlines()[1:]})
    assert video["count"] == n_videos and video["kinds"] == ["video"] and video["num_frames"] == 4
    assert video["data"]["format"] == "msrvtt"


def test_folder_with_images_videos_and_a_broken_file(small_world: Path, tmp_path: Path) -> None:
    folder = tmp_path / "media"
    (folder / "sub").mkdir(parents=True)
    images = sorted((small_world / "images" / "clean").glob("*.png"))[:3]
    for i, path in enumerate(images):
        shutil.copy(path, folder / ("sub" if i else "") / path.name)
    shutil.copy(sorted((small_world / "video" / "videos").glob("*.mp4"))[0], folder / "clip.mp4")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    manifest = build_index(tmp_path / "idx", "vlprompt-tiny", str(folder), num_frames=3, **TINY)
    assert manifest["skipped"] == ["broken.png"] and manifest["count"] == 4
    assert manifest["kinds"] == ["image", "video"] and manifest["data"]["format"] == "folder"
    index = SearchIndex(tmp_path / "idx", encoder=False)
    assert sorted(it["id"] for it in index.items) == sorted([images[0].name, *(f"sub/{p.name}" for p in images[1:]),
                                                              "clip.mp4"])  # fmt: skip
    with pytest.raises(ConfigError, match="no captions"):
        build_index(tmp_path / "t", "vlprompt-tiny", str(folder), modality="text", **TINY)


def test_index_parameters() -> None:
    p = index_params("ivfpq", None, n=10_000, dim=512)
    assert p["m"] == 64 and p["nlist"] == 256 and p["nprobe"] == 16 and p["nbits"] == 8
    with pytest.raises(ConfigError, match="at least 256 items"):
        index_params("ivfpq", None, n=100, dim=128)
    with pytest.raises(ConfigError, match="must divide"):
        index_params("ivfpq", {"m": 7}, n=10_000, dim=128)
    with pytest.raises(ConfigError, match="unknown parameter"):
        index_params("hnsw", {"nprobe": 3}, n=10, dim=8)
    with pytest.raises(ConfigError, match="index kind"):
        index_params("lsh", None, n=10, dim=8)


def test_model_and_data_resolution(small_world: Path, tmp_path: Path) -> None:
    # a run directory: its config gives both the model (prompts loaded from the checkpoint) and the data
    from vlprompt.config import load_config
    from vlprompt.core.checkpoint import save_trainable
    from vlprompt.core.factory import build_model
    from vlprompt.core.rundir import atomic_write_text
    from vlprompt.index.sources import load_model
    from vlprompt.run_layout import STATE

    run = tmp_path / "run"
    overrides = ["backbone.pretrained=null", "method.name=vpt", "method.n_tokens=2", "device=cpu",
                 f"data.root={small_world}", "data.test=retrieval/test_clean.json"]  # fmt: skip
    cfg = load_config(None, overrides)
    atomic_write_text(run / "config.yaml", Path(_write_config(cfg, tmp_path / "c.yaml")).read_text())
    torch.manual_seed(0)
    method = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.normal_()  # "trained" prompts, far from any initialisation
    step = run / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    save_trainable(step / "trainable.safetensors", method)
    (step / STATE).write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step_1")

    manifest = build_index(tmp_path / "idx", str(run), device="cpu")
    assert manifest["model"]["kind"] == "run" and manifest["data"]["annotation"] == "retrieval/test_clean.json"
    index = SearchIndex(tmp_path / "idx", device="cpu")
    first = index.media_path(0)
    with torch.no_grad():
        image = method.backbone.preprocess_val(Image.open(first).convert("RGB"))[None]
        expected = method.eval().encode_image(image).numpy()
    np.testing.assert_allclose(index.vectors([0]), expected, atol=1e-5)  # the run's prompts were used
    # a new checkpoint makes the index stale: refused, not silently mismatched
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(1.0)
    save_trainable(step / "trainable.safetensors", method)
    with pytest.raises(ConfigError, match="changed since the index was built"):
        load_model(manifest["model"], "cpu")

    with pytest.raises(ConfigError, match="give --data"):
        build_index(tmp_path / "x", "vlprompt-tiny", None, **TINY)
    with pytest.raises(DataError, match="does not exist"):
        build_index(tmp_path / "x", "vlprompt-tiny", str(tmp_path / "nope.json"), **TINY)
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(ConfigError, match="expected a run directory"):
        build_index(tmp_path / "x", str(tmp_path / "not_a_run"), None)
    with pytest.raises(ConfigError, match="give --pretrained"):
        build_index(tmp_path / "x", "ViT-B-32", str(_annotation(small_world)), device="cpu")
    with pytest.raises(ConfigError, match="data.val is empty"):
        build_index(tmp_path / "x", str(run), split="val", device="cpu")


def _write_config(cfg, path: Path) -> str:
    from vlprompt.config import to_yaml

    path.write_text(to_yaml(cfg))
    return str(path)


def test_an_empty_annotation_file_has_no_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlprompt.cli.main import main

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match=r"empty.json holds no records"):
        build_index(tmp_path / "idx", "vlprompt-tiny", str(empty), **TINY)
    argv = ["index", "build", "--model", "vlprompt-tiny", "--pretrained", "none", "--device", "cpu", "--quiet"]
    assert main([*argv, "--data", str(empty), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert "no records" in err and "out of range" not in err
    (tmp_path / "not_a_list.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="not a Karpathy-style JSON list"):
        build_index(tmp_path / "idx", "vlprompt-tiny", str(tmp_path / "not_a_list.json"), **TINY)


def test_building_again_repairs_a_damaged_cache(small_world: Path, tmp_path: Path) -> None:
    build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), shard_size=8, **TINY)
    before = SearchIndex(tmp_path / "idx", encoder=False).vectors()
    shard = tmp_path / "idx" / "cache" / "image" / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(DataError, match=r"shard_00001.npy is missing or damaged.*same `vlprompt index build` again"):
        SearchIndex(tmp_path / "idx", encoder=False)
    build_index(tmp_path / "idx", "vlprompt-tiny", str(_annotation(small_world)), shard_size=8, **TINY)
    np.testing.assert_allclose(SearchIndex(tmp_path / "idx", encoder=False).vectors(), before, atol=1e-6)
