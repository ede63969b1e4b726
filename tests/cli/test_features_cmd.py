"""``vlprompt features extract|info`` and ``vlprompt eval --protocol`` on the small generated image-text set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlprompt.cli.main import main


def _config(tmp_path: Path, root: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "backbone: {name: vlprompt-tiny, pretrained: null}\nmethod: {name: zeroshot}\n"
        f"data: {{root: {root}, train: train.json, test: test.json}}\n"
    )
    return cfg


def test_extract_then_info(image_text_set: Path, tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, image_text_set)
    out = tmp_path / "text"
    args = ["features", "extract", str(cfg), "--modality", "text", "--out", str(out), "--quiet", "--shard-size", "10"]
    assert main(args) == 0
    assert "24 x 128 float16 (vlprompt-tiny@None/text)" in capsys.readouterr().out
    assert main(["features", "info", str(out), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 24 and info["shards"] == 3 and info["modality"] == "text" and info["info.split"] == "train"
    # the same command again reuses the finished cache; another split in the same folder is refused in one line
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "already holds another feature cache" in err and "Traceback" not in err


def test_eval_protocols(image_text_set: Path, tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, image_text_set)
    assert main(["eval", str(cfg), "--json"]) == 0
    cross = json.loads(capsys.readouterr().out)
    assert not any("NDCG" in k for k in cross)  # the default protocol is unchanged
    rel = tmp_path / "rel.npy"
    assert main(["eval", str(cfg), "--protocol", "single-modal", "--relevance", str(rel), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert {k for k in single if "NDCG" in k} == {f"{d}/NDCG@{k}" for d in ("i2i", "t2t") for k in (10, 20, 50)}
    assert {k: single[k] for k in cross} == cross
    assert np.load(rel).shape == (24, 12)  # computed once and saved for the next evaluation
    assert main(["eval", str(cfg), "--protocol", "mixed", "--relevance", str(rel), "--official-ndcg", "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert {k for k in mixed if "NDCG" in k} == {f"{d}/NDCG@{k}" for d in ("i2it", "t2it") for k in (10, 20, 50)}
