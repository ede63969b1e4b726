"""Tests for the text-video annotation readers and the video Datasets (on tiny files and the embedded world)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlprompt.data import collate_skip_none
from vlprompt.data.video import VideoTransform
from vlprompt.data.video_datasets import (
    GalleryVideos,
    VideoTextPairs,
    VideoTextSplit,
    read_activitynet,
    read_didemo,
    read_lsmdc,
    read_msrvtt,
    read_msvd,
    read_vatex,
    read_video_split,
)
from vlprompt.data.world.layout import video_dir, video_root
from vlprompt.errors import DataError

av = pytest.importorskip("av")


def _touch(root: Path, *names: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- readers


def test_msrvtt_train_expands_captions_and_test_csv(tmp_path):
    _write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\n")
    data = {
        "videos": [{"video_id": f"video{i}"} for i in range(3)],
        "sentences": [
            {"caption": "a cat", "video_id": "video0", "sen_id": 0},
            {"caption": "a test video", "video_id": "video2", "sen_id": 1},
            {"caption": "a dog", "video_id": "video1", "sen_id": 2},
            {"caption": "a small cat", "video_id": "video0", "sen_id": 3},
        ],
    }
    _write(tmp_path / "MSRVTT_data.json", json.dumps(data))
    _write(tmp_path / "MSRVTT_JSFUSION_test.csv", 'key,vid_key,video_id,sentence\nret0,msr2,video2,"a man, singing"\n')
    train = read_msrvtt(tmp_path, tmp_path / "videos", "train")
    assert train.video_ids == ["video0", "video1"]
    assert train.captions == ["a cat", "a small cat", "a dog"] and train.txt2vid == [0, 0, 1]
    assert train.video_paths[0] == tmp_path / "videos" / "video0.mp4"
    assert train.vid2txt == [[0, 1], [2]]
    test = read_video_split("msrvtt", tmp_path, tmp_path / "videos", "test")
    assert test.video_ids == ["video2"] and test.captions == ["a man, singing"] and test.txt2vid == [0]


def test_msrvtt_malformed_files_name_file_and_record(tmp_path):
    _write(tmp_path / "MSRVTT_train.7k.csv", "vid\nvideo0\n")
    with pytest.raises(DataError, match=r"MSRVTT_train.7k.csv.*video_id"):
        read_msrvtt(tmp_path, tmp_path, "train", csv_name="MSRVTT_train.7k.csv")
    _write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\n")
    _write(tmp_path / "MSRVTT_data.json", json.dumps({"sentences": [{"caption": "x", "video_id": "video0"}, {}]}))
    with pytest.raises(DataError, match=r"MSRVTT_data.json: sentences record 1"):
        read_msrvtt(tmp_path, tmp_path, "train")
    _write(tmp_path / "MSRVTT_data.json", "{not json")
    with pytest.raises(DataError, match=r"MSRVTT_data.json: not valid JSON \(line 1"):
        read_msrvtt(tmp_path, tmp_path, "train")
    _write(tmp_path / "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nr,m,video1,\n")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv: line 2"):
        read_msrvtt(tmp_path, tmp_path, "test")
    with pytest.raises(DataError, match="val.csv"):
        read_msrvtt(tmp_path, tmp_path, "val")


def test_vatex_multi_sentence_and_finds_other_extensions(tmp_path):
    refs = {"vA": ["one", "two", "three"], "vB": ["four"], "vC": ["five"]}
    _write(tmp_path / "ref_captions.json", json.dumps(refs))
    _write(tmp_path / "train_list.txt", "vA\nvC\n")
    _write(tmp_path / "test_list.txt", "vB\nvA\n\n")
    _touch(tmp_path / "v", "vA.mkv", "sub/vB.mp4")
    test = read_vatex(tmp_path, tmp_path / "v", "test")
    assert test.video_ids == ["vB", "vA"] and test.captions == ["four", "one", "two", "three"]
    assert test.txt2vid == [0, 1, 1, 1]
    assert test.video_paths == [tmp_path / "v/sub/vB.mp4", tmp_path / "v/vA.mkv"]
    assert read_vatex(tmp_path, tmp_path / "v", "val").video_ids == ["vB", "vA"]  # reference: val = test list
    _write(tmp_path / "ref_captions.json", json.dumps({"vA": "not a list"}))
    with pytest.raises(DataError, match=r"ref_captions.json: record 'vA'"):
        read_vatex(tmp_path, tmp_path / "v", "train")


def test_lsmdc_tab_separated_and_video_path_json(tmp_path):
    times = ["00.00.01.000", "00.00.02.000", "00.00.03.000", "00.00.04.000"]
    lines = [
        "\t".join([f"1010_TITANIC_{times[0]}-{times[1]}", *times[:2], *times[:2], "SOMEONE runs."]),
        "\t".join([f"1010_TITANIC_{times[2]}-{times[3]}", *times[2:], *times[2:], "She smiles."]),
    ]
    _write(tmp_path / "LSMDC16_challenge_1000_publictect.csv", "\n".join(lines) + "\n")
    _touch(tmp_path / "v", "1010_TITANIC/1010_TITANIC_00.00.01.000-00.00.02.000.avi")
    split = read_lsmdc(tmp_path, tmp_path / "v", "test")
    assert split.captions == ["SOMEONE runs.", "She smiles."] and split.txt2vid == [0, 1]
    # Without video_path.json the tree is searched by stem; an unknown clip gets the default path (reported later).
    assert split.video_paths[0] == tmp_path / "v/1010_TITANIC/1010_TITANIC_00.00.01.000-00.00.02.000.avi"
    assert split.video_paths[1] == tmp_path / "v/1010_TITANIC_00.00.03.000-00.00.04.000.mp4"
    _write(tmp_path / "video_path.json", json.dumps({split.video_ids[1]: "x/clip2.avi"}))
    assert read_lsmdc(tmp_path, tmp_path / "v", "test").video_paths[1] == tmp_path / "v/x/clip2.avi"
    _write(tmp_path / "LSMDC16_annos_training.csv", lines[0] + "\nclip\tonly three\tfields\n")
    with pytest.raises(DataError, match=r"LSMDC16_annos_training.csv: line 2: expected 6"):
        read_lsmdc(tmp_path, tmp_path / "v", "train")


def test_activitynet_paragraphs_exclude_and_path_map(tmp_path):
    caps = {
        "v_abc": {"duration": 10.5, "timestamps": [[0, 3], [3, 9]], "sentences": ["A man walks.", " He sits. "]},
        "v_NHznDFD3V3k": {"duration": 5, "timestamps": [[0, 5]], "sentences": ["Broken."]},
    }
    _write(tmp_path / "val_1.json", json.dumps(caps))
    _write(tmp_path / "val_ids.json", json.dumps(["v_abc", "v_NHznDFD3V3k"]))
    _write(tmp_path / "video_path.json", json.dumps({"abc": "abc.mkv"}))
    split = read_activitynet(tmp_path, tmp_path / "v", "test", exclude=["v_NHznDFD3V3k"])
    assert split.video_ids == ["v_abc"] and split.captions == ["A man walks. He sits."]
    assert split.video_paths == [tmp_path / "v/abc.mkv"]
    assert read_activitynet(tmp_path, tmp_path / "v", "val").num_videos == 2
    _write(tmp_path / "train_ids.json", json.dumps(["v_zzz"]))
    _write(tmp_path / "train.json", json.dumps({}))
    with pytest.raises(DataError, match=r"train.json: no record for video 'v_zzz'"):
        read_activitynet(tmp_path, tmp_path / "v", "train")
    _write(tmp_path / "train.json", json.dumps({"v_zzz": {"duration": 1, "sentences": "one string"}}))
    with pytest.raises(DataError, match=r"train.json: record 'v_zzz'"):
        read_activitynet(tmp_path, tmp_path / "v", "train")


def test_msvd_pickle_tokens_joined(tmp_path):
    raw = {"vid1": [["a", "man", "cooks"], ["someone", "is", "cooking"]], "vid2": [["a", "dog"]]}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    _write(tmp_path / "test_list.txt", "vid2\nvid1\n")
    _touch(tmp_path / "v", "vid1.avi", "vid2.avi")
    split = read_msvd(tmp_path, tmp_path / "v", "test")
    assert split.captions == ["a dog", "a man cooks", "someone is cooking"] and split.txt2vid == [0, 1, 1]
    assert split.video_paths[1] == tmp_path / "v/vid1.avi"
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"vid1": [[1, 2]]}))
    with pytest.raises(DataError, match=r"raw-captions.pkl: record 'vid1'"):
        read_msvd(tmp_path, tmp_path / "v", "test")
    # A pickle that would construct objects is refused, not executed.
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"vid1": [Path("x")]}))
    with pytest.raises(DataError, match="raw-captions.pkl"):
        read_msvd(tmp_path, tmp_path / "v", "test")


def test_didemo_paragraphs_and_list_filter(tmp_path):
    recs = [
        {"video": "12@N0_34.mov", "times": [[0, 0], [0, 1]], "description": "a girl waves."},
        {"video": "56@N0_78.mp4", "times": [[2, 2]], "description": "car drives by."},
        {"video": "12@N0_34.mov", "times": [[3, 4]], "description": "she leaves."},
    ]
    _write(tmp_path / "val_data.json", json.dumps(recs))
    _touch(tmp_path / "v", "12@N0_34.mov")
    split = read_didemo(tmp_path, tmp_path / "v", "val")
    assert split.video_ids == ["12@N0_34.mov", "56@N0_78.mp4"]
    assert split.captions == ["a girl waves. she leaves.", "car drives by."]
    assert split.video_paths[0] == tmp_path / "v/12@N0_34.mov"
    _write(tmp_path / "val_list.txt", "56@N0_78.mp4\n")
    assert read_didemo(tmp_path, tmp_path / "v", "val").video_ids == ["56@N0_78.mp4"]
    _write(tmp_path / "test_data.json", json.dumps([{"video": "x", "times": []}]))
    with pytest.raises(DataError, match=r"test_data.json: record 0"):
        read_didemo(tmp_path, tmp_path / "v", "test")


def test_subset_renumbers_captions():
    split = VideoTextSplit(["a", "b", "c"], [Path("a"), Path("b"), Path("c")], ["a1", "b1", "c1", "a2"], [0, 1, 2, 0])
    sub = split.subset([0, 2])
    assert sub.video_ids == ["a", "c"] and sub.captions == ["a1", "a2", "c1"] and sub.txt2vid == [0, 0, 1]


# ---------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def world_video(small_world: Path) -> tuple[Path, Path]:
    return video_root(small_world), video_dir(small_world)


def test_pairs_and_gallery_on_world_with_collate(world_video):
    ann, videos = world_video
    transform = VideoTransform(32)
    train = read_msrvtt(ann, videos, "train")
    pairs = VideoTextPairs(train, 4, transform, seed=1)
    assert len(pairs) == len(train.captions) and not pairs.bad_samples
    frames, mask, caption, v = pairs[0]
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == torch.float32
    assert mask.tolist() == [True] * 4 and caption == train.captions[0] and v == train.txt2vid[0]
    # Random draws depend on (seed, epoch, index) only.
    again = VideoTextPairs(train, 4, transform, seed=1)
    assert torch.equal(again[0][0], frames)
    test = read_msrvtt(ann, videos, "test")
    gallery = GalleryVideos(test, 16, transform)  # world videos have 12 frames: 4 padded
    batch = next(iter(DataLoader(gallery, batch_size=3, collate_fn=collate_skip_none)))
    frames, mask, idx = batch
    assert frames.shape == (3, 16, 3, 32, 32) and idx.tolist() == [0, 1, 2]
    assert mask[0].tolist() == [True] * 12 + [False] * 4


def test_one_caption_per_video_mode(world_video):
    ann, videos = world_video
    train = read_msrvtt(ann, videos, "train")
    pairs = VideoTextPairs(train, 2, None, seed=0, expand_sentences=False)
    assert len(pairs) == train.num_videos
    draws = []
    for epoch in range(4):
        pairs.set_epoch(epoch)
        frames, _, caption, v = pairs[5]
        assert frames.dtype == torch.uint8 and v == 5 and caption in [train.captions[t] for t in train.vid2txt[5]]
        draws.append(caption)
    assert len(set(draws)) > 1


def test_missing_and_corrupt_videos_are_dropped_or_skipped(world_video, tmp_path):
    _, videos = world_video
    good = [videos / "video0.mp4", videos / "video1.mp4"]
    corrupt = tmp_path / "bad.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    split = VideoTextSplit(
        ["v0", "gone", "bad", "v1"],
        [good[0], tmp_path / "gone.mp4", corrupt, good[1]],
        ["c0", "g0", "b0", "c1", "g1"],
        [0, 1, 2, 3, 1],
    )
    pairs = VideoTextPairs(split, 4, VideoTransform(32))
    assert pairs.split.video_ids == ["v0", "bad", "v1"]
    assert pairs.split.captions == ["c0", "b0", "c1"] and pairs.split.txt2vid == [0, 1, 2]
    assert pairs.bad_samples.counts == {"missing": 1}
    assert pairs[1] is None and pairs.bad_samples.counts == {"missing": 1, "unreadable": 1}
    batch = collate_skip_none([pairs[i] for i in range(len(pairs))])
    assert batch[0].shape[0] == 2 and list(batch[2]) == ["c0", "c1"] and batch[3].tolist() == [0, 2]
    gallery = GalleryVideos(split, 4, None)
    assert gallery[1] is None and gallery.bad_samples.total == 2
    with pytest.raises(DataError, match="gone.mp4"):
        GalleryVideos(split, 4, None, strict=True)
    strict = GalleryVideos(split.subset([0, 2]), 4, None, strict=True)
    with pytest.raises(DataError, match="bad.mp4"):
        strict[1]


def test_frame_folder_videos_in_a_dataset(world_video, tmp_path):
    from PIL import Image

    _, videos = world_video
    folder = tmp_path / "frames" / "video7"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 50,) * 3).save(folder / f"{i:05d}.jpg")
    shutil.copy(videos / "video0.mp4", tmp_path / "frames" / "video0.mp4")
    _write(tmp_path / "test_list.txt", "video7\nvideo0\n")
    _write(tmp_path / "ref_captions.json", json.dumps({"video7": ["x"], "video0": ["y"]}))
    split = read_vatex(tmp_path, tmp_path / "frames", "test")
    assert split.video_paths[0] == folder
    gallery = GalleryVideos(split, 4, VideoTransform(16))
    frames, mask, _ = gallery[0]
    assert frames.shape == (4, 3, 16, 16) and mask.tolist() == [True, True, True, False]
    assert gallery[1][0].shape == (4, 3, 16, 16)
