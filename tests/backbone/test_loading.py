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


# ---- a run directory as a backbone ------------------------------------------------------------------------------
def _train_run(root: Path, out: Path, name: str, *overrides: str) -> Path:
    from vlprompt.config import load_config
    from vlprompt.core import train

    cfg = load_config(None, ["method.name=finetune", "backbone.pretrained=null", f"data.root={root}",
                             "data.train=train.json", "data.test=test.json", "train.epochs=1", "train.batch_size=8",
                             "train.eval_every=0", f"out_dir={out}", f"run_name={name}", *overrides])  # fmt: skip
    train(cfg, progress=False)
    return out / name


def _checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from vlprompt.run_layout import latest_checkpoint

    return load_file(str(latest_checkpoint(run) / "trainable.safetensors"))


@pytest.fixture(scope="module")
def finetuned(image_text_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full fine-tuning run (every CLIP weight trained, from random init)."""
    return _train_run(image_text_set, tmp_path_factory.mktemp("runs"), "ft")


def test_a_full_fine_tuning_run_directory_is_a_backbone(finetuned):
    trained = _checkpoint_tensors(finetuned)
    torch.manual_seed(123)  # another random init: equality below means the run's tensors were loaded
    backbone = vlprompt.load_backbone("vlprompt-tiny", pretrained=str(finetuned))
    state = backbone.model.state_dict()
    assert {loading.RUN_MODEL_PREFIX + k for k in state} == set(trained)  # finetune saved the whole CLIP
    for key, value in state.items():
        assert torch.equal(value, trained[loading.RUN_MODEL_PREFIX + key]), key
    assert loading.run_backbone(finetuned) == ("vlprompt-tiny", None)


def test_a_run_chain_takes_each_runs_trained_tower(finetuned, image_text_set, tmp_path):
    # fine-tune only the text tower, starting from the full fine-tuning run: vision weights come from that run
    second = _train_run(image_text_set, tmp_path, "text_only", f"backbone.pretrained={finetuned}",
                        "method.tower=text")  # fmt: skip
    first, own = _checkpoint_tensors(finetuned), _checkpoint_tensors(second)
    assert own and not any(k.startswith("backbone.model.visual.") for k in own)
    state = vlprompt.load_backbone("vlprompt-tiny", pretrained=str(second)).model.state_dict()
    for key, value in state.items():
        source = own if loading.RUN_MODEL_PREFIX + key in own else first
        assert torch.equal(value, source[loading.RUN_MODEL_PREFIX + key]), key
    moved = [k for k in own if not torch.equal(own[k], first[k])]
    assert moved  # the second run did train: its text tower differs from the first run's


def test_the_full_model_exports_as_an_open_clip_checkpoint(finetuned, tmp_path):
    expected = vlprompt.load_backbone("vlprompt-tiny", pretrained=str(finetuned)).model.state_dict()
    path = loading.save_open_clip_checkpoint(vlprompt.load_backbone("vlprompt-tiny", str(finetuned)).model,
                                             tmp_path / "ft.safetensors")  # fmt: skip
    loading.register_model_configs()
    torch.manual_seed(7)
    model = open_clip.create_model_and_transforms("vlprompt-tiny", pretrained=str(path))[0]  # open_clip alone
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_prompt_run_is_not_a_backbone(image_text_set, tmp_path):
    run = _train_run(image_text_set, tmp_path, "coop", "method.name=coop")
    with pytest.raises(
        WeightsUnavailableError, match=r"trained no CLIP weights .*context\.ctx.*unchanged vlprompt-tiny"
    ):
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(run))


def test_run_directory_errors_say_what_is_wrong(finetuned, tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"trained backbone 'vlprompt-tiny', not 'vlprompt-small': set "
                       r"backbone\.name=vlprompt-tiny"):  # fmt: skip
        vlprompt.load_backbone("vlprompt-small", pretrained=str(finetuned))
    with pytest.raises(WeightsUnavailableError, match="is a folder but not a run directory"):
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(tmp_path))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finetuned / "config.yaml").read_text())
    with pytest.raises(WeightsUnavailableError, match=r"unfinished has no checkpoint"):
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(unfinished))
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(finetuned, killed)
    (killed / "metrics.json").unlink()
    with pytest.raises(WeightsUnavailableError, match=r"killed has not finished \(no metrics.json\).*resume=true"):
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(killed))
    loop = tmp_path / "loop"
    shutil.copytree(finetuned, loop)
    text = (loop / "config.yaml").read_text()
    (loop / "config.yaml").write_text(text.replace("pretrained: null", f"pretrained: {loop}"))
    with pytest.raises(WeightsUnavailableError, match="loops back"):
        vlprompt.load_backbone("vlprompt-tiny", pretrained=str(loop))


# ---- offline: fail at once, naming the file, instead of a minute of hub retries ------------------------------
def _empty_hub_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # whatever this machine has cached is not used
    return constants


def test_hf_hub_offline_fails_in_seconds_and_names_the_download(monkeypatch, tmp_path):
    import time

    constants = _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as when the variable is set after the hub's import
    monkeypatch.setattr(loading, "_hub_answers", lambda endpoint: pytest.fail("no network check: the env says"))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        loading.create_clip("RN50", "openai")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert open_clip.get_pretrained_cfg("RN50", "openai")["hf_hub"] in message and "HF_HUB_OFFLINE is set" in message
    assert constants.HF_HUB_OFFLINE is False  # the hub's own switch is restored afterwards


def test_an_unreachable_hub_counts_as_offline(monkeypatch, tmp_path):
    import time

    constants = _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(loading, "_hub_answers", lambda endpoint: asked.append(endpoint) or False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="did not answer within") as info:
        loading.create_clip("RN50", "openai")
    assert time.perf_counter() - start < 5 and asked and "resnet50_clip.openai" in str(info.value)
    # local weights, random init and unknown tags never ask the hub
    asked.clear()
    loading.create_clip("vlprompt-tiny", "world")
    loading.create_clip("vlprompt-tiny", None)
    with pytest.raises(WeightsUnavailableError, match="no pretrained tag"):
        loading.create_clip("RN50", "no-such-tag")
    assert not asked


def test_the_hub_check_is_one_short_request(monkeypatch):
    import urllib.error
    import urllib.request

    calls = []

    def refuse(request, timeout):
        calls.append((request.get_method(), timeout))
        raise urllib.error.URLError("unreachable")

    loading._hub_answers.cache_clear()
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    try:
        assert loading._hub_answers("https://hub.invalid") is False
        assert loading._hub_answers("https://hub.invalid") is False  # asked once per process
    finally:
        loading._hub_answers.cache_clear()
    assert calls == [("HEAD", loading.HUB_CHECK_SECONDS)]
