"""``vlprompt caption`` and ``vlprompt train`` of a captioner: outputs, the captioning evaluation, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import vlprompt.eval.captioning as caption_eval
from runners.caption_setup import save_tiny_lm, three_images, train_overrides  # tests/ is on sys.path
from vlprompt.cli.main import main


@pytest.fixture(scope="module")
def trained(image_text_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vlprompt train` of a 2-step ClipCap config (a YAML file, as users write them), without Java."""
    tmp = tmp_path_factory.mktemp("caption_cli")
    lm = save_tiny_lm(tmp / "lm")
    overrides = train_overrides(lm, image_text_set, tmp / "runs", "clipcap_tiny")
    config = tmp / "clipcap_tiny.yaml"
    config.write_text(yaml.safe_dump({"method": {"name": "clipcap"}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption_eval, "java_problem", lambda: "no java (test)")
        assert main(["train", str(config), *overrides, "--quiet", "--json"]) == 0
    return tmp / "runs" / "clipcap_tiny"


def test_train_evaluates_a_captioner_by_captioning(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"CIDEr", "BLEU-4", "CLIPScore", "RefCLIPScore"} <= set(metrics["test"])
    assert not any("R@1" in k for k in metrics["test"])  # no retrieval evaluation of a captioner


def test_caption_a_folder_writes_captions_and_prints_the_summary(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = three_images(tmp_path / "imgs")
    rc = main(["caption", str(trained), "--images", str(images), "--out", str(tmp_path / "o"), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 3 and printed["out"] == str(tmp_path / "o")
    assert len(json.loads((tmp_path / "o" / "captions.json").read_text())) == 3


def test_caption_default_output_is_inside_the_run(trained: Path, image_text_set: Path) -> None:
    rc = main(["caption", str(trained), "--data", str(image_text_set / "test.json"), "--metrics", "BLEU-1,CIDEr"])
    assert rc == 0
    summary = json.loads((trained / "captions" / "metrics.json").read_text())
    assert set(summary["metrics"]["all"]) >= {"BLEU-1", "CIDEr", "RefCLIPScore"}
    assert "METEOR" not in summary["metrics"]["all"]  # only what --metrics asked for


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "/no/such/folder"], "image folder not found"),
        (["--data", "/no/such/file.json"], "annotation file not found"),
        (["--images", ".", "--metrics", "CIDEr,BLEU"], "unknown caption metrics"),
        (["--tta", "rlcf", "tta.steps=0", "--images", "."], "adapts nothing"),
    ],
)
def test_bad_input_is_one_line_naming_it(trained: Path, capsys: pytest.CaptureFixture, args, message) -> None:
    assert main(["caption", str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_train_refuses_a_test_time_method(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "r.yaml"
    config.write_text("method: {name: rlcf_caption}\n")
    assert main(["train", str(config)]) == 2
    assert "vlprompt caption" in capsys.readouterr().err
