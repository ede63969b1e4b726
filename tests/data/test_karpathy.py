"""Tests for the Karpathy/ALBEF JSON retrieval reader."""

import json

import pytest
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from vlprompt.data import GalleryImages, ImageTextPairs, collate_skip_none, load_gallery, read_annotations
from vlprompt.errors import DataError


def _images(root, names):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (i * 40, 0, 0)).save(path)


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


TRAIN = [
    {"image": "img/a.jpg", "caption": "a one", "image_id": "a", "category": "x"},
    {"image": "img/a.jpg", "caption": "a two", "image_id": "a", "category": "x"},
    {"image": "img/b.jpg", "caption": "b one", "image_id": "b", "category": "y"},
    {"image": "img/c.jpg", "caption": "c one", "image_id": "c", "category": "x"},
]
TEST = [
    {"image": "img/a.jpg", "caption": ["a one", "a two"]},
    {"image": "img/b.jpg", "caption": "b only"},
    {"image": "img/c.jpg", "caption": ["c one", "c two", "c three"]},
]


@pytest.fixture
def root(tmp_path):
    _images(tmp_path, ["img/a.jpg", "img/b.jpg", "img/c.jpg"])
    return tmp_path


def _check_links(g):
    assert len(g.txt2img) == len(g.captions) and len(g.img2txt) == g.num_images == len(g.records)
    for img, txts in enumerate(g.img2txt):
        assert all(g.txt2img[t] == img for t in txts)
    assert sorted(t for txts in g.img2txt for t in txts) == list(range(len(g.captions)))


def test_pairs_number_unique_images(root):
    ds = ImageTextPairs(_write(root / "train.json", TRAIN), root, ToTensor())
    assert len(ds) == 4 and ds.num_images == 3
    assert [img for img, _ in ds.pairs] == [0, 0, 1, 2]
    image, caption, img = ds[2]
    assert image.shape == (3, 6, 8) and caption == "b one" and img == 1
    assert not ds.bad_samples


def test_pairs_filter_and_caption_lists(root):
    ds = ImageTextPairs(_write(root / "train.json", TRAIN), root, ToTensor(), filter=lambda r: r["category"] == "x")
    assert [c for _, c in ds.pairs] == ["a one", "a two", "c one"] and ds.num_images == 2
    # A test-format file also trains: every caption of an image becomes a pair.
    ds = ImageTextPairs(_write(root / "test.json", TEST), root, ToTensor())
    assert len(ds) == 6 and ds.num_images == 3


def test_gallery_from_test_file(root):
    g = load_gallery(_write(root / "test.json", TEST), root)
    assert g.captions == ["a one", "a two", "b only", "c one", "c two", "c three"]
    assert g.txt2img == [0, 0, 1, 2, 2, 2] and g.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert g.image_paths[1] == root / "img/b.jpg" and g.records[2] is not None
    _check_links(g)


def test_gallery_from_train_file_groups_by_image(root):
    g = load_gallery(_write(root / "train.json", TRAIN), root)
    assert g.img2txt == [[0, 1], [2], [3]] and g.records[0]["caption"] == ["a one", "a two"]
    assert g.records[0]["image_id"] == "a"
    _check_links(g)


def test_absolute_image_paths_ignore_root(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    recs = [{"image": str(root / "img/a.jpg"), "caption": ["x"]}]
    g = load_gallery(_write(root / "abs.json", recs), other)
    assert g.image_paths == [root / "img/a.jpg"]


def test_missing_image_dropped_and_reindexed(root):
    (root / "img/b.jpg").unlink()
    g = load_gallery(_write(root / "test.json", TEST), root)
    assert g.num_images == 2 and g.captions == ["a one", "a two", "c one", "c two", "c three"]
    assert g.img2txt == [[0, 1], [2, 3, 4]] and g.txt2img == [0, 0, 1, 1, 1]
    _check_links(g)
    assert g.bad_samples.counts == {"missing": 1} and "b.jpg" in g.bad_samples.examples[0][0]

    ds = ImageTextPairs(_write(root / "train.json", TRAIN), root, ToTensor())
    assert ds.num_images == 2 and [img for img, _ in ds.pairs] == [0, 0, 1]
    assert ds.bad_samples.total == 1


def test_missing_image_strict_raises(root):
    (root / "img/b.jpg").unlink()
    with pytest.raises(DataError, match="b.jpg"):
        load_gallery(_write(root / "test.json", TEST), root, strict=True)
    with pytest.raises(DataError, match="b.jpg"):
        ImageTextPairs(root / "test.json", root, ToTensor(), strict=True)


def test_wrong_root_is_a_clear_error(root, tmp_path_factory):
    with pytest.raises(DataError, match="none of the images exist"):
        load_gallery(_write(root / "test.json", TEST), tmp_path_factory.mktemp("empty"))


def test_corrupt_image_skipped_by_collate(root):
    (root / "img/b.jpg").write_bytes(b"\x00garbage")
    g = load_gallery(_write(root / "test.json", TEST), root)
    images = GalleryImages(g, ToTensor())
    assert images[1] is None and images.bad_samples.counts == {"unreadable": 1}
    batch = next(iter(DataLoader(images, batch_size=3, collate_fn=collate_skip_none)))
    assert batch[0].shape == (2, 3, 6, 8) and batch[1].tolist() == [0, 2]
    with pytest.raises(DataError, match="b.jpg"):
        GalleryImages(g, ToTensor(), strict=True)[1]

    ds = ImageTextPairs(root / "test.json", root, ToTensor())
    assert ds[2] is None and ds[0] is not None


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"image": "a.jpg"}', "expected a JSON list"),
        ('[{"image": "a.jpg", "caption": "x"}, {"caption": "y"}]', "record 1: missing key 'image'"),
        ('[{"image": "a.jpg"}]', "record 0: missing key 'caption'"),
        ('[{"image": "a.jpg", "caption": 3}]', "record 0: 'caption' must be"),
        ('[{"image": "a.jpg", "caption": ["ok", 5]}]', "record 0: 'caption' list must hold strings"),
        ('[{"image": "a.jpg", "caption": []}]', "record 0: 'caption' is an empty list"),
        ('[{"image": 7, "caption": "x"}]', "record 0: 'image' must be"),
        ('["a.jpg"]', "record 0: expected an object"),
    ],
)
def test_malformed_annotations_name_file_and_record(tmp_path, content, needle):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_annotations(path)
    assert "ann.json" in str(err.value) and needle in str(err.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_gallery(tmp_path / "absent.json", tmp_path)
