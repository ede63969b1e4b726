"""Sharing a trained prompt: ``vlprompt export`` writes a Hub-layout folder; that folder, and ``hf-hub:ORG/NAME`` (a
Hugging Face cache populated here, offline), load back to the same embeddings in eval, index and the Python API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vlprompt
from vlprompt.cli.main import main
from vlprompt.config import load_config
from vlprompt.core import train
from vlprompt.core.hub import REFERENCE_CODE, export_run, from_pretrained, model_card, resolve_trained
from vlprompt.errors import ConfigError, WeightsUnavailableError
from vlprompt.index.sources import load_model, model_spec
from vlprompt.run_layout import WEIGHTS, latest_checkpoint
from vlprompt.runners.eval_run import evaluate_target

CAPTIONS = ["a red square", "a blue circle", "a picture of a green triangle"]


@pytest.fixture(scope="module")
def trained_run(image_text_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CoOp run on the tiny generated set: 4 optimizer steps of the tiny random-init CLIP."""
    out = tmp_path_factory.mktemp("hub_runs")
    cfg = load_config(None, [
        "method.name=coop", "backbone.pretrained=null", f"data.root={image_text_set}", "data.train=train.json",
        "data.val=val.json", "data.test=test.json", "train.epochs=2", "train.max_steps=4", "train.batch_size=8",
        "train.lr=0.05", f"out_dir={out}", "run_name=coop", "log.report_to=tensorboard",
    ])  # fmt: skip
    train(cfg, progress=False)
    return out / "coop"


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(trained_run, tmp_path_factory.mktemp("exports") / "coop-tiny", license="mit")


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _embeddings(method) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        size = method.backbone.image_size
        images = torch.nn.functional.interpolate(_images(), size=(size, size))
        return method.encode_image(images), method.encode_text(CAPTIONS)


def _assert_same_embeddings(a, b) -> None:
    for x, y in zip(_embeddings(a), _embeddings(b)):  # the same computation on the same inputs
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.fixture
def hub_cache(exported: Path, tmp_path: Path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding ``org/coop-tiny`` (the export) in the hub cache layout."""
    import huggingface_hub.constants as hf

    cache, commit = tmp_path / "hf_cache", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--coop-tiny"
    shutil.copytree(exported, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


# ---- the folder -------------------------------------------------------------------------------------------------
def test_export_holds_config_trained_tensors_metrics_and_card(trained_run: Path, exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.yaml", "metrics.json", WEIGHTS]
    ours, run = load_file(str(exported / WEIGHTS)), load_file(str(latest_checkpoint(trained_run) / WEIGHTS))
    assert ours.keys() == run.keys() == {"context.ctx"}  # the trained tensors only, no backbone
    assert all(torch.equal(ours[k], run[k]) for k in ours)
    cfg = load_config(exported / "config.yaml")
    assert cfg.method["name"] == "coop" and cfg.log.report_to == [] and not cfg.resume and cfg.device == "auto"
    read = lambda folder: json.loads((folder / "metrics.json").read_text())  # noqa: E731
    assert read(exported) == read(trained_run)


def test_model_card_has_hub_front_matter_and_what_a_user_needs(trained_run: Path, exported: Path) -> None:
    text = (exported / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "vlprompt" and meta["license"] == "mit"
    assert {"vlprompt", "coop", "image-text-retrieval"} <= set(meta["tags"])
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert f"| t2i/R@1 | {metrics['test']['t2i/R@1']:.2f} | {metrics['val']['t2i/R@1']:.2f} |" in body
    table = body.split("## Metrics")[1].split("##")[0]
    rows = [line.split(" |")[0][2:] for line in table.splitlines() if line.startswith("| ")]
    assert rows[1:7] == ["i2t/R@1", "i2t/R@5", "i2t/R@10", "i2t/MdR", "i2t/MnR", "t2i/R@1"]  # as people read them
    assert rows[-1] == "rsum" and rows[0] == "metric"
    assert "`vlprompt-tiny`" in body and "pretrained tag: `None`" in body  # backbone and tag it needs
    assert "| `context.ctx` | [4, 128] | 512 |" in body and "512 trained numbers" in body
    assert "vlprompt train config.yaml data.root=" in body and REFERENCE_CODE["coop"] in body


def test_model_card_carries_the_reference_codes_licence(trained_run: Path) -> None:
    cfg = load_config(trained_run / "config.yaml")
    cfg.method = {"name": "dgl"}
    card = model_card(cfg, {"w": torch.zeros(2, 3)}, {}, {}, "unknown", "x")
    assert "CC BY-NC 4.0: non-commercial use only" in card and "No final metrics were recorded" in card
    assert "license: unknown" in card and "6 trained numbers in 1 tensor (" in card


def test_export_refuses_what_it_cannot_share(trained_run: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exists and is not empty; pass --overwrite"):
        export_run(trained_run, exported)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not an exported folder; refusing to replace it"):
        export_run(trained_run, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    untrained = tmp_path / "zeroshot"
    untrained.mkdir()
    shutil.copy(trained_run / "config.yaml", untrained / "config.yaml")
    with pytest.raises(ConfigError, match="has no checkpoint: nothing was trained"):
        export_run(untrained, tmp_path / "out")
    with pytest.raises(ConfigError, match="is already an exported folder"):
        export_run(exported, tmp_path / "out")


def test_export_command_writes_and_overwrites(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shared"
    assert main(["export", str(trained_run), str(out)]) == 0
    assert "exported" in capsys.readouterr().out and "license: unknown" in (out / "README.md").read_text()
    assert main(["export", str(trained_run), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(trained_run), str(out), "--license", "apache-2.0", "--overwrite"]) == 0
    assert "license: apache-2.0" in (out / "README.md").read_text()


# ---- loading it back ----------------------------------------------------------------------------------------------
def test_round_trip_gives_the_trained_embeddings(trained_run: Path, exported: Path) -> None:
    loaded = vlprompt.from_pretrained(exported, device="cpu")
    _assert_same_embeddings(loaded, from_pretrained(trained_run, device="cpu"))
    assert not loaded.training
    untrained = load_config(exported / "config.yaml")
    from vlprompt.core.factory import build_model

    torch.manual_seed(untrained.seed)
    fresh = build_model(untrained, torch.device("cpu")).eval()  # the same init, without the trained tensors
    assert (_embeddings(fresh)[1] - _embeddings(loaded)[1]).abs().max() > 1e-3


def test_save_pretrained_writes_a_folder_that_loads_back(trained_run: Path, tmp_path: Path) -> None:
    method = from_pretrained(trained_run, device="cpu")
    cfg = load_config(trained_run / "config.yaml")
    out = vlprompt.save_pretrained(method, cfg, tmp_path / "saved")
    _assert_same_embeddings(from_pretrained(out, device="cpu"), method)


def test_eval_of_the_folder_equals_eval_of_the_run(trained_run: Path, exported: Path) -> None:
    assert evaluate_target(exported) == pytest.approx(evaluate_target(trained_run))
    assert main(["eval", str(exported), "--json"]) == 0


def test_hf_hub_id_loads_from_the_cache_offline(trained_run: Path, exported: Path, hub_cache: Path) -> None:
    trained = resolve_trained("hf-hub:org/coop-tiny")
    assert trained.kind == "export" and trained.folder.is_relative_to(hub_cache)
    from_hub = from_pretrained("hf-hub:org/coop-tiny", device="cpu")
    _assert_same_embeddings(from_hub, from_pretrained(exported, device="cpu"))
    assert evaluate_target("hf-hub:org/coop-tiny") == pytest.approx(evaluate_target(trained_run))


def test_hf_hub_errors_say_what_to_do(hub_cache: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"cannot download hf-hub:org/missing .*hf download org/missing"):
        resolve_trained("hf-hub:org/missing")  # offline and not cached
    with pytest.raises(ConfigError, match="expected hf-hub:ORG/NAME"):
        resolve_trained("hf-hub:just-a-name")
    other = hub_cache / "models--org--clip" / "snapshots" / ("1" * 40)
    other.mkdir(parents=True)
    (other / "README.md").write_text("an open_clip model")
    (hub_cache / "models--org--clip" / "refs").mkdir()
    (hub_cache / "models--org--clip" / "refs" / "main").write_text("1" * 40)
    with pytest.raises(ConfigError, match="hf-hub:org/clip is not a vlprompt export"):
        resolve_trained("hf-hub:org/clip")
    (other / "open_clip_config.json").write_text("{}")  # an open_clip model: a backbone where one is accepted
    assert resolve_trained("hf-hub:org/clip", backbone_ok=True) is None
    spec = model_spec("hf-hub:org/clip")  # no --pretrained needed: open_clip takes the repository's weights
    assert (spec["kind"], spec["target"], spec["pretrained"]) == ("backbone", "hf-hub:org/clip", None)


def test_hf_hub_download_failures_are_clear(monkeypatch) -> None:
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(*args, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/name"))
        raise RepositoryNotFoundError("404 Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(WeightsUnavailableError, match="no such repository on the Hugging Face Hub, or it is private"):
        resolve_trained("hf-hub:org/name")


def test_index_model_spec_takes_the_folder_and_the_hub_id(exported: Path, hub_cache: Path) -> None:
    from_folder = model_spec(str(exported))
    from_hub = model_spec("hf-hub:org/coop-tiny")
    assert from_folder["kind"] == from_hub["kind"] == "run"
    assert from_folder["fingerprint"] == from_hub["fingerprint"]  # the same tensors
    assert Path(from_hub["checkpoint"]).is_relative_to(hub_cache)
    _assert_same_embeddings(load_model(from_hub, "cpu"), load_model(from_folder, "cpu"))
    assert model_spec(str(exported), overrides=["log.report_to=tensorboard"])["fingerprint"] == from_folder[
        "fingerprint"]  # fmt: skip


def test_shared_config_drops_what_only_the_training_machine_had() -> None:
    from vlprompt.core.hub import shareable_config

    cfg = load_config(None, ["method.name=dgl", "method.reference_checkpoint=/home/me/dgl.pth", "resume=true",
                             "device=cuda:3", "log.report_to=wandb", "out_dir=/home/me/runs",
                             "run_name=dgl_a"])  # fmt: skip
    shared = shareable_config(cfg)
    assert shared.method["reference_checkpoint"] == "" and cfg.method["reference_checkpoint"] == "/home/me/dgl.pth"
    assert (shared.resume, shared.device, shared.log.report_to, shared.out_dir) == (False, "auto", [], "runs")
    assert shared.run_name == "dgl_a" and shared.method["name"] == "dgl"


def test_card_names_the_backbones_hub_repository_and_warns_about_local_weights(tmp_path: Path) -> None:
    from_tag = model_card(load_config(None, ["backbone.name=ViT-B-32", "backbone.pretrained=openai"]), {}, {}, {},
                          "mit", "x")  # fmt: skip
    assert "base_model: timm/vit_base_patch32_clip_224.openai" in from_tag and "local path" not in from_tag
    weights = tmp_path / "clip.pt"
    local = model_card(load_config(None, ["backbone.name=ViT-B-32", f"backbone.pretrained={weights}"]), {}, {}, {},
                       "mit", "x")  # fmt: skip
    assert "base_model" not in local and f"local path on the machine that trained this prompt (`{weights}`)" in local
