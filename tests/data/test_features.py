"""The feature cache: lookup by id, checksum tied to the index, crash-resume per shard, image-text alignment."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import vlprompt
from vlprompt.config import DataConfig
from vlprompt.data.features import (
    FeatureCache,
    caption_sample_id,
    extract_features,
    extract_split_features,
    index_checksum,
    pair_sample_ids,
    shard_name,
)
from vlprompt.errors import DataError


def _fake_features(items: list[str]) -> torch.Tensor:
    """A deterministic 'encoder': each string maps to its own vector."""
    rows = [np.random.default_rng(zlib.crc32(s.encode())).standard_normal(6) for s in items]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


class CountingEncoder:
    def __init__(self, fail_after: int | None = None) -> None:
        self.rows = 0
        self.fail_after = fail_after

    def __call__(self, items: list[str]) -> torch.Tensor:
        if self.fail_after is not None and self.rows >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.rows += len(items)
        return _fake_features(list(items))


ITEMS = [f"item {i}" for i in range(23)]
IDS = [f"id-{i}" for i in range(23)]


def test_lookup_by_id_and_row(tmp_path: Path) -> None:
    cache = extract_features(_fake_features, ITEMS, IDS, tmp_path / "c", "fake", "text", batch_size=4, shard_size=5)
    assert len(cache) == 23 and cache.dim == 6 and cache.meta["dtype"] == "float16"
    assert len(list((tmp_path / "c").glob("shard_*.npy"))) == 5
    expected = _fake_features(ITEMS).numpy()
    np.testing.assert_allclose(cache.load_all(), expected, atol=2e-3)  # fp16 storage
    picked = ["id-22", "id-3", "id-3", "id-10"]
    np.testing.assert_allclose(cache.lookup(picked), expected[[22, 3, 3, 10]], atol=2e-3)
    np.testing.assert_array_equal(cache.rows_of(IDS), np.arange(23))  # the cache's own index: identity
    with pytest.raises(DataError, match="'nope' is not in the feature cache"):
        cache.lookup(["id-1", "nope"])
    with pytest.raises(IndexError):
        cache.take([23])


def test_checksum_is_tied_to_the_index(tmp_path: Path) -> None:
    cache = extract_features(_fake_features, ITEMS, IDS, tmp_path / "c", "fake", shard_size=8)
    assert cache.checksum == index_checksum(IDS)
    cache.verify(IDS)
    with pytest.raises(DataError, match="another dataset index"):
        cache.verify(IDS[::-1])
    # another dataset in the same folder is refused unless overwritten
    other = [i + "x" for i in IDS]
    with pytest.raises(DataError, match="index_checksum"):
        extract_features(_fake_features, ITEMS, other, tmp_path / "c", "fake", shard_size=8)
    with pytest.raises(DataError, match="encoder"):
        extract_features(_fake_features, ITEMS, IDS, tmp_path / "c", "another encoder", shard_size=8)
    replaced = extract_features(_fake_features, ITEMS, other, tmp_path / "c", "fake", shard_size=8, overwrite=True)
    assert replaced.rows_of(["id-0x"]).tolist() == [0]


def test_crash_loses_at_most_one_shard(tmp_path: Path) -> None:
    crashing = CountingEncoder(fail_after=12)  # dies in the third shard of 5 rows
    with pytest.raises(KeyboardInterrupt):
        extract_features(crashing, ITEMS, IDS, tmp_path / "c", "fake", batch_size=2, shard_size=5)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert not meta["complete"] and sorted(meta["shards"]) == ["0", "1"]
    with pytest.raises(DataError, match="incomplete"):
        FeatureCache(tmp_path / "c")
    resumed = CountingEncoder()
    cache = extract_features(resumed, ITEMS, IDS, tmp_path / "c", "fake", batch_size=2, shard_size=5)
    assert resumed.rows == 23 - 10  # only the shards that were not finished
    np.testing.assert_allclose(cache.load_all(), _fake_features(ITEMS).numpy(), atol=2e-3)
    again = CountingEncoder()
    extract_features(again, ITEMS, IDS, tmp_path / "c", "fake", batch_size=2, shard_size=5)
    assert again.rows == 0  # complete: nothing recomputed


def test_damaged_shard_is_detected_and_recomputed(tmp_path: Path) -> None:
    cache = extract_features(_fake_features, ITEMS, IDS, tmp_path / "c", "fake", shard_size=10)
    shard = tmp_path / "c" / shard_name(1)
    data = np.load(shard)
    data[0, 0] += 1
    np.save(shard, data)
    with pytest.raises(DataError, match="corrupt"):
        FeatureCache(cache.root).verify(deep=True)
    counter = CountingEncoder()
    extract_features(counter, ITEMS, IDS, tmp_path / "c", "fake", shard_size=10)
    assert counter.rows == 10
    FeatureCache(cache.root).verify(deep=True)


def test_unloadable_samples_are_zero_rows(tmp_path: Path) -> None:
    items = [None if i in (2, 7) else s for i, s in enumerate(ITEMS)]
    cache = extract_features(_fake_features, items, IDS, tmp_path / "c", "fake", shard_size=4)
    assert cache.missing == ["id-2", "id-7"]
    assert not cache.lookup(["id-2"]).any() and cache.lookup(["id-3"]).any()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        extract_features(_fake_features, ITEMS[:2], ["a", "a"], tmp_path / "c", "fake")
    with pytest.raises(ValueError, match="ids for"):
        extract_features(_fake_features, ITEMS, IDS[:3], tmp_path / "c", "fake")
    with pytest.raises(DataError, match="no feature cache"):
        FeatureCache(tmp_path / "missing")


def test_image_text_caches_align_with_the_training_pairs(image_text_set: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()
    data = DataConfig(root=str(image_text_set), train="train.json", test="test.json")
    text = extract_split_features(data, "train", "text", tmp_path / "txt", backbone, "tiny/text", shard_size=7)
    image = extract_split_features(data, "train", "image", tmp_path / "img", backbone, "tiny/image", shard_size=5)
    pairs = vlprompt.data.ImageTextPairs(image_text_set / "train.json", image_text_set, backbone.preprocess_val)
    image_ids, caption_ids = pair_sample_ids(pairs, image_text_set)
    assert len(image) == pairs.num_images and len(text) == len(pairs)
    # every pair's caption row holds the features of that very caption (ids carry a hash of the text)
    with torch.no_grad():
        direct = backbone.encode_text([cap for _, cap in pairs.pairs]).numpy()
        direct_img = backbone.encode_image(torch.stack([pairs[i][0] for i in range(3)])).numpy()
    np.testing.assert_allclose(text.lookup(caption_ids), direct, atol=2e-2, rtol=1e-2)
    assert caption_ids[0] == caption_sample_id(image_ids[pairs.pairs[0][0]], pairs.pairs[0][1])
    rows = image.rows_of([image_ids[pairs.pairs[i][0]] for i in range(3)])
    np.testing.assert_allclose(image.take(rows), direct_img, atol=2e-2, rtol=1e-2)
    assert image_ids[0].startswith("images/")  # relative to the data root, so the data can move
    gallery = extract_split_features(data, "test", "text", tmp_path / "gal", backbone, "tiny/text")
    assert len(gallery) == 24  # 12 test images x 2 captions


def test_shards_are_checked_against_meta_without_reading_them(tmp_path: Path) -> None:
    cache = extract_features(_fake_features, ITEMS, IDS, tmp_path / "c", "fake", shard_size=10)
    FeatureCache(cache.root).check_shards()
    shard = tmp_path / "c" / shard_name(2)  # the last, shorter shard: 3 rows
    np.save(shard, np.zeros((4, 6), dtype=np.float16))  # one row too many
    with pytest.raises(DataError, match=r"shard_00002.npy holds float16 \[4, 6\], meta.json records float16 \[3, 6\]"):
        FeatureCache(cache.root).verify()
    shard.unlink()
    with pytest.raises(DataError, match="shard_00002.npy is missing or damaged"):
        FeatureCache(cache.root).check_shards()
    with pytest.raises(DataError, match="missing or damaged"):
        FeatureCache(cache.root).take([21])  # a lookup says the same, not FileNotFoundError
    FeatureCache(cache.root).take([0, 19])  # the other shards are fine
