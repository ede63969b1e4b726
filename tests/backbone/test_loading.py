"""Loading backbones: clear WeightsUnavailableError messages, local checkpoints, embedded models. No downloads."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

import vlprompt
from vlprompt.backbone import loading
from vlprompt.errors import WeightsUnavailableError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Belt and braces: nothing here may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None)


def test_embedded_models_are_known_architectures():
    names = loading.available_backbones()
    for name in loading.EMBEDDED_MODELS:
        assert name in names
    assert "ViT-B-16" in names


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(WeightsUnavailableError, match="ViT-B-32x") as info:
        vlprompt.load_backbone("ViT-B-32x", pretrained=None)
    assert "Did you mean" in str(info.value) and "ViT-B-32," in str(info.value)


def test_unknown_architecture_without_close_names_points_to_the_list():
    with pytest.raises(WeightsUnavailableError, match="vlprompt list backbones"):
        vlprompt.load_backbone("qqqqqqqqqqqq", pretrained=None)


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(WeightsUnavailableError, match="no pretrained tag 'bogus'") as info:
        vlprompt.load_backbone("ViT-B-32", pretrained="bogus")
    message = str(info.value)
    for tag in open_clip.list_pretrained_tags_by_model("ViT-B-32"):
        assert tag in message
    assert "openai" in message and "laion2b_s34b_b79k" in message


def test_missing_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(WeightsUnavailableError, match="does not exist") as info:
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(missing))
    assert str(missing) in str(info.value)


def test_embedded_world_weights_missing_says_how_to_create_them(tmp_path, monkeypatch):
    name = "vlprompt-tiny"
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    shipped = Path(loading.__file__).resolve().parents[1] / "assets" / "models" / f"{name}.safetensors"
    if not shipped.exists():
        assert loading.embedded_weights_path(name) == tmp_path / "models" / f"{name}.safetensors"
    # pretend nothing is shipped, so the lookup falls back to the (empty) cache
    monkeypatch.setattr(loading, "embedded_weights_path", lambda n: tmp_path / "models" / f"{n}.safetensors")
    with pytest.raises(WeightsUnavailableError, match="vlprompt pretrain") as info:
        vlprompt.load_backbone(name, pretrained="world")
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "failure", [OSError("We couldn't connect to 'https://huggingface.co'"), RuntimeError("offline")]
)
def test_offline_download_failure_says_what_to_download(monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    with pytest.raises(WeightsUnavailableError) as info:
        vlprompt.load_backbone("ViT-B-32", pretrained="openai")
    message = str(info.value)
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert cfg.get("hf_hub") or cfg.get("url")
    assert (cfg.get("hf_hub") or cfg.get("url")) in message
    assert "ViT-B-32" in message and "openai" in message and "backbone.pretrained=" in message
    assert info.value.__cause__ is failure


def test_hf_hub_failure_suggests_local_dir(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    with pytest.raises(WeightsUnavailableError, match="local-dir:") as info:
        vlprompt.load_backbone("hf-hub:someorg/somerepo", pretrained=None)
    assert "someorg/somerepo" in str(info.value)


def test_local_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, so equality means the file was read
    loaded = vlprompt.load_backbone("vlprompt-tiny", pretrained=str(path))
    ours, theirs = tiny.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
    assert loaded.pretrained == str(path)


def test_random_init_depends_on_seed_only():
    torch.manual_seed(5)
    a = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)
    torch.manual_seed(5)
    b = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)
    torch.manual_seed(6)
    c = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)


def test_backbone_reports_architecture_facts(tiny):
    assert (tiny.embed_dim, tiny.vision_width, tiny.text_width) == (128, 192, 128)
    assert (tiny.context_length, tiny.image_size) == (32, 64)
    assert tiny.tokenize("a cat").shape == (1, 32)
    assert tiny.vision.num_layers == tiny.text.num_layers == 4


@pytest.mark.parametrize("kind", ["corrupt", "other_architecture"])
def test_unreadable_checkpoint_is_a_weights_error(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(b"this is not a checkpoint")
    else:
        torch.manual_seed(0)
        torch.save(vlprompt.load_backbone("vlprompt-small", pretrained=None).model.state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match=str(path)):
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_shipped_weights_load_on_the_gpu():
    cpu = vlprompt.load_backbone("vlprompt-tiny", pretrained="world")
    gpu = vlprompt.load_backbone("vlprompt-tiny", pretrained="world", device="cuda")
    tokens = cpu.tokenize(["a red star"])
    with torch.no_grad():
        expected = cpu.encode_text(tokens)
        got = gpu.encode_text(tokens.cuda()).cpu()
    assert torch.allclose(got, expected, atol=1e-4)
