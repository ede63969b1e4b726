"""Captioning runs: ClipCap training with the captioning evaluation (and resume), captioning a folder or an
annotation file with and without RLCF (the mapper restored bit for bit per image), metrics per domain, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlprompt.eval.captioning as caption_eval
import vlprompt.runners.caption as runner
from runners.caption_setup import CAPTIONER, save_tiny_lm, three_images, train_overrides
from vlprompt.config import load_config
from vlprompt.core.trainer import _Interrupt
from vlprompt.data.captions import CaptionSet
from vlprompt.errors import ConfigError, DataError
from vlprompt.run_layout import WEIGHTS, latest_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NO_JAVA = "java not found (test)"
# a randomly initialised reward CLIP: the world's reads the random BPE captions as zeros (equal rewards, no gradient)
REWARD = ["method.reward=[vlprompt-tiny]", "method.reward_pretrained=[none]"]
TTA = ["tta.steps=2", "tta.lr=0.05", "method.sample_k=3", *REWARD]


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """coco-caption as on a machine without Java: METEOR/SPICE unavailable, the Python PTB tokenizer."""
    monkeypatch.setattr(caption_eval, "java_problem", lambda: NO_JAVA)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_opt"))


@pytest.fixture(scope="module")
def run(lm: Path, image_text_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-step ClipCap run (checkpoint every step), trained without Java."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption_eval, "java_problem", lambda: NO_JAVA)
        cfg = load_config(None, train_overrides(lm, image_text_set, out, "full", "train.checkpoint_every=1"))
        result = runner.train_captioner(cfg, progress=False)
    return out / "full", result


def test_training_evaluates_by_captioning_with_unavailable_metrics_named(run: tuple[Path, dict]) -> None:
    folder, result = run
    assert result["steps"] == 2
    test = result["test"]
    assert test["images"] == 12  # the conftest's 12 test images, each decoded once
    assert 0 <= test["CIDEr"] <= 10 and 0 <= test["BLEU-4"] <= 1
    assert 0 <= test["CLIPScore"] <= 2.5 and 0 <= test["RefCLIPScore"] <= 1
    assert test["METEOR"] is None and test["unavailable"]["METEOR"] == NO_JAVA  # never 0, never dropped
    assert test["tokenizer"].startswith(caption_eval.TOKENIZER_PYTHON)
    assert set(result["val"]) == set(test)  # validation through the same hook
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["test"]["CIDEr"] == pytest.approx(test["CIDEr"])
    tensors = load_file(str(latest_checkpoint(folder) / WEIGHTS))
    assert tensors and all(k.startswith("captioner.mapper.") for k in tensors)  # the mapper alone is saved


def test_resume_after_kill_matches_the_uninterrupted_run(
    run: tuple[Path, dict], lm: Path, image_text_set: Path, no_java: None
) -> None:
    out = run[0].parent
    overrides = train_overrides(lm, image_text_set, out, "cut", "train.checkpoint_every=1")
    with pytest.raises(_Interrupt):
        runner.train_captioner(load_config(None, overrides), progress=False, interrupt_at_step=2)
    assert latest_checkpoint(out / "cut").name == "step_00000001"  # killed during step 2, before its checkpoint
    resumed = runner.train_captioner(load_config(None, [*overrides, "resume=true"]), progress=False)
    assert resumed["steps"] == 2
    full = load_file(str(latest_checkpoint(run[0]) / WEIGHTS))
    cut = load_file(str(latest_checkpoint(out / "cut") / WEIGHTS))
    assert full.keys() == cut.keys()
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=1e-6, atol=1e-7)
    assert resumed["test"]["CIDEr"] == pytest.approx(run[1]["test"]["CIDEr"], abs=1e-6)


def test_caption_a_folder_without_references(run: tuple[Path, dict], tmp_path: Path) -> None:
    images = three_images(tmp_path / "imgs")
    summary = runner.caption_images(run[0], images=images, out=tmp_path / "out")
    captions = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert [c["id"] for c in captions] == ["img0.png", "img1.png", "img2.png"]
    assert all(isinstance(c["caption"], str) for c in captions)
    assert summary["adapted"] is False and summary["images"] == 3 and summary["seconds_per_image"] > 0
    scores = summary["metrics"]["all"]
    assert set(scores) == {"images", "CLIPScore"}  # no references: no RefCLIPScore, no coco-caption metrics
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"] == 3
    assert "clipcap" in (tmp_path / "out" / "config.yaml").read_text()


def test_rlcf_restores_the_mapper_bit_for_bit_after_every_image(
    run: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each image starts from the trained mapper and a zeroed AdamW state, and adapting moves the mapper; so
    image 2's caption does not depend on whether images 0 and 1 were adapted first."""
    real_adapt, seen = runner.adapt, []

    def recording_adapt(method, episode, steps, optimizer):
        before = [p.detach().clone() for p in method.trainable_parameters()]
        state = [t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        real_adapt(method, episode, steps, optimizer)
        after = [p.detach().clone() for p in method.trainable_parameters()]
        seen.append((before, state, after))

    monkeypatch.setattr(runner, "adapt", recording_adapt)
    images = three_images(tmp_path / "imgs")
    adapted = runner.caption_images(run[0], TTA, images=images, tta="rlcf", out=tmp_path / "all")
    assert adapted["adapted"] and adapted["method"] == "rlcf_caption" and adapted["tta"]["K"] == 3
    assert len(seen) == 3
    trained = load_file(str(latest_checkpoint(run[0]) / WEIGHTS))
    start = seen[0][0]
    assert sum(p.numel() for p in start) == sum(t.numel() for t in trained.values())
    for before, state, after in seen:
        assert all(torch.equal(a, b) for a, b in zip(before, start))
        assert all(not t.any() for t in state)  # AdamW starts from zero moments every image
        assert not all(torch.equal(a, b) for a, b in zip(after, before))  # it did adapt

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "img2.png").write_bytes((images / "img2.png").read_bytes())
    single = runner.caption_images(run[0], TTA, images=alone, tta="rlcf", out=tmp_path / "one")
    assert single["adapted"]
    captions = {c["id"]: c["caption"] for c in json.loads((tmp_path / "all" / "captions.json").read_text())}
    only = json.loads((tmp_path / "one" / "captions.json").read_text())
    assert only[0]["caption"] == captions["img2.png"]


def test_an_rlcf_recipe_with_a_runs_weights_adapts_unless_tta_none(
    run: tuple[Path, dict], lm: Path, tmp_path: Path
) -> None:
    images = three_images(tmp_path / "imgs")
    recipe = tmp_path / "rlcf_caption_tiny.yaml"
    recipe.write_text("method: {name: rlcf_caption}\n")
    overrides = [f"method.lm={lm}", *CAPTIONER, *TTA]
    plain = runner.caption_images(recipe, overrides, images=images, weights=run[0], tta="none", out=tmp_path / "a")
    assert plain["adapted"] is False and plain["method"] == "rlcf_caption"
    runner.caption_images(run[0], images=images, out=tmp_path / "b")  # the trained ClipCap itself
    assert _captions(tmp_path / "a") == _captions(tmp_path / "b")  # the run's mapper was loaded
    adapted = runner.caption_images(recipe, overrides, images=images, weights=run[0], out=tmp_path / "c")
    assert adapted["adapted"] and adapted["tta"] == {"steps": 2, "lr": 0.05, "K": 3}
    with pytest.raises(ConfigError, match="--weights goes with a config"):
        runner.caption_images(run[0], images=images, weights=run[0])


def _captions(out: Path) -> list[str]:
    return [c["caption"] for c in json.loads((out / "captions.json").read_text())]


def test_nocaps_file_gives_metrics_per_domain(run: tuple[Path, dict], tmp_path: Path, no_java: None) -> None:
    images = three_images(tmp_path / "validation")
    ann = {
        "images": [
            {"id": 7, "file_name": "img0.png", "domain": "in-domain"},
            {"id": 8, "file_name": "img1.png", "domain": "out-domain"},
            {"id": 9, "file_name": "img2.png", "domain": "out-domain"},
        ],
        "annotations": [
            {"image_id": 7, "id": 1, "caption": "a red block on white"},
            {"image_id": 8, "id": 2, "caption": "a green block"},
            {"image_id": 8, "id": 3, "caption": "a green square on white"},
            {"image_id": 9, "id": 4, "caption": "a blue block"},
        ],
    }
    path = tmp_path / "nocaps_val.json"
    path.write_text(json.dumps(ann))
    # a randomly initialised evaluation CLIP: cosines of both signs (the world's CLIP reads random BPE as zeros)
    scorer = ["method.clipscore_model=vlprompt-tiny", "method.clipscore_pretrained=none"]
    summary = runner.caption_images(run[0], scorer, annotations=path, image_root=images, out=tmp_path / "o",
                                    metrics=["BLEU-4", "CIDEr", "METEOR"])  # fmt: skip
    assert summary["clipscore_model"] == "vlprompt-tiny:none"
    m = summary["metrics"]
    assert list(m) == ["in-domain", "out-domain", "all"]
    assert [m[d]["images"] for d in m] == [1, 2, 3]
    for scores in m.values():
        assert isinstance(scores["CIDEr"], float) and isinstance(scores["RefCLIPScore"], float)
        assert scores["METEOR"] is None and scores["unavailable"] == {"METEOR": NO_JAVA}
        assert "SPICE" not in scores  # not asked for
    captions = json.loads((tmp_path / "o" / "captions.json").read_text())
    assert [(c["id"], c["domain"]) for c in captions] == [("7", "in-domain"), ("8", "out-domain"), ("9", "out-domain")]


class _StubScorer:
    """Constructed text features: caption "x" along the image features, "y" orthogonal, "z" at cosine 0.6."""

    rows = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [0.6, 0.8]}

    def text_features(self, texts):
        return torch.tensor([self.rows.get(t.split()[0], [0.6, 0.8]) for t in texts], dtype=torch.float64)


def test_domains_are_scored_separately_and_all_over_every_image(no_java: None) -> None:
    images = CaptionSet([Path(f"{i}.png") for i in range(3)], ["a", "b", "c"], [["x"], ["y"], ["z"]],
                        ["in-domain", "out-domain", "out-domain"], "test")  # fmt: skip
    feats = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    m = runner._domain_metrics(images, [0, 1, 2], ["x", "y", "z"], feats, _StubScorer(), ["BLEU-1"])
    assert list(m) == ["in-domain", "out-domain", "all"]
    assert m["in-domain"]["CLIPScore"] == pytest.approx(2.5)
    assert m["out-domain"]["CLIPScore"] == pytest.approx(2.5 * 0.6 / 2)
    assert m["all"]["CLIPScore"] == pytest.approx(2.5 * 1.6 / 3)
    assert m["in-domain"]["BLEU-1"] == pytest.approx(1.0, abs=1e-6)  # "x" against its own reference
    one = runner._domain_metrics(images, [0, 2], ["x", "z"], feats[:2], _StubScorer(), ["BLEU-1"])
    assert list(one) == ["in-domain", "out-domain", "all"] and one["out-domain"]["images"] == 1  # kept images only


def test_karpathy_file_with_whatever_java_is_here(
    run: tuple[Path, dict], image_text_set: Path, tmp_path: Path
) -> None:
    summary = runner.caption_images(run[0], annotations=image_text_set / "test.json", out=tmp_path / "o",
                                    metrics=["BLEU-1"])  # fmt: skip
    scores = summary["metrics"]["all"]
    assert scores["images"] == 12 and isinstance(scores["BLEU-1"], float)
    java = caption_eval.java_problem()
    assert scores["tokenizer"].startswith(caption_eval.TOKENIZER_PYTHON if java else caption_eval.TOKENIZER_JAVA)


def test_a_corrupt_image_is_skipped_with_a_warning(
    run: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = three_images(tmp_path / "imgs")
    (images / "img1.png").write_bytes(b"not a png")
    summary = runner.caption_images(run[0], images=images, out=tmp_path / "o")
    assert summary["images"] == 2 and summary["bad_samples"]["total"] == 1
    assert [c["id"] for c in json.loads((tmp_path / "o" / "captions.json").read_text())] == ["img0.png", "img2.png"]
    assert "img1.png" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"images": []}), "'images' and 'annotations'"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}), "has no caption"),
        (json.dumps([{"image": "a.png"}]), "missing key 'caption'"),
        (json.dumps("text"), "expected a Karpathy JSON list"),
    ],
)
def test_malformed_annotation_files_are_named(run: tuple[Path, dict], tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        runner.caption_images(run[0], annotations=path, out=tmp_path / "o")


def test_bad_requests_fail_before_any_model_loads(run: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        runner.caption_images(run[0], images=tmp_path / "missing")
    with pytest.raises(ConfigError, match="either an image folder or an annotation file"):
        runner.caption_images(run[0], images=tmp_path, annotations=tmp_path / "a.json")
    with pytest.raises(ConfigError, match="nothing to caption"):
        runner.caption_images(run[0], ["data.test="])
    with pytest.raises(ConfigError, match="unknown caption metrics"):
        runner.caption_images(run[0], images=tmp_path, metrics=["CIDEr-D"])
    config = tmp_path / "zs.yaml"
    config.write_text("method: {name: zeroshot}\n")
    with pytest.raises(ConfigError, match="not a captioner"):
        runner.caption_images(config, images=tmp_path)


# RLCF spec 2c's script table: (T, lr, K) of tta_{capdec,clipcap}_{c2f,c2n} (nocaps: the in-domain case).
@pytest.mark.parametrize(
    "recipe, steps, lr, k",
    [("capdec_flickr", 4, 5e-6, 6), ("capdec_nocaps", 4, 3e-6, 6), ("clipcap_flickr", 4, 2e-6, 10),
     ("clipcap_nocaps", 4, 2e-6, 10)],
)  # fmt: skip
def test_rlcf_caption_recipes_carry_the_reference_scripts_settings(recipe: str, steps: int, lr: float, k: int):
    cfg = load_config(CONFIGS / f"rlcf_caption_{recipe}.yaml")
    assert (cfg.tta.steps, cfg.tta.lr, cfg.method["sample_k"]) == (steps, pytest.approx(lr), k)
    assert (cfg.tta.eps, cfg.tta.weight_decay) == (pytest.approx(1e-6), 0.0)  # AdamW as the reference
    assert cfg.method["reward"] == ["ViT-L-14"] and cfg.backbone.name == "ViT-B-16"
    assert cfg.data.format == ("nocaps" if "nocaps" in recipe else "karpathy")


@pytest.mark.parametrize("model", ["clipcap", "capdec"])
def test_training_recipes_follow_the_spec(model: str) -> None:
    cfg = load_config(CONFIGS / f"{model}_coco.yaml")
    t = cfg.train
    assert (t.epochs, t.lr, t.batch_size, t.warmup_steps) == (10, pytest.approx(2e-5), 40, 5000)
    assert cfg.method["name"] == model and cfg.method["lm"] == "facebook/opt-125m"
    assert runner.is_captioning(cfg)


def test_tta_rlcf_on_a_real_clip_run_takes_the_coco_to_flickr_script_and_the_paper_reward(tmp_path: Path) -> None:
    run_dir = tmp_path / "capdec_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((CONFIGS / "capdec_coco.yaml").read_text())
    cfg, trained = runner.resolve_captioner(run_dir, ["tta.lr=1e-5"], tta="rlcf")
    assert trained is not None and cfg.method["name"] == "rlcf_caption"
    assert (cfg.tta.steps, cfg.tta.lr, cfg.method["sample_k"]) == (4, pytest.approx(1e-5), 6)  # overrides win
    assert cfg.method["reward"] == ["ViT-L-14"] and cfg.method["lm"] == "facebook/opt-125m"
    assert "embedding" not in cfg.method  # CapDec's training options are not rlcf_caption's
