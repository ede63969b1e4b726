"""Typed configs: YAML + key=value overrides, with errors that say what is valid."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vlprompt.config import Config, load_config, options_from_dict, to_yaml
from vlprompt.errors import ConfigError

YAML = """\
backbone:
  name: ViT-B-16
  pretrained: null
method:
  name: coop
  n_ctx: 8
train:
  epochs: 3
  lr: 0.01
seed: 7
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "coop_flickr.yaml"
    path.write_text(YAML)
    return path


def test_defaults_without_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.backbone.name == "vlprompt-tiny" and cfg.backbone.pretrained == "world"
    assert cfg.method == {"name": "zeroshot"}
    assert cfg.train.epochs == 5 and cfg.run_name == ""


def test_yaml_and_overrides(recipe):
    cfg = load_config(recipe, ["train.lr=0.5", "train.batch_size=8", "method.n_ctx=16", "data.strict=true"])
    assert cfg.backbone.name == "ViT-B-16" and cfg.backbone.pretrained is None
    assert cfg.method == {"name": "coop", "n_ctx": 16}
    assert cfg.train.epochs == 3  # from the file
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)  # override beats file
    assert cfg.train.batch_size == 8 and isinstance(cfg.train.batch_size, int)
    assert cfg.data.strict is True
    assert cfg.train.optimizer == "adamw"  # untouched default
    assert cfg.seed == 7


def test_run_name_defaults_to_yaml_stem(recipe):
    assert load_config(recipe).run_name == "coop_flickr"
    assert load_config(recipe, ["run_name=mine"]).run_name == "mine"
    assert load_config(str(recipe)).run_name == "coop_flickr"


@pytest.mark.parametrize("override", ["train.epochz=3", "nonsense=1", "backbone.size=4"])
def test_unknown_override_key_lists_valid_keys(recipe, override):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(recipe, [override])
    message = str(info.value)
    assert override.split("=")[0] in message
    for key in ("train.epochs", "backbone.name", "data.root", "seed", "run_name"):
        assert key in message


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch") as info:
        load_config(path)
    assert "train.epochs" in str(info.value)


@pytest.mark.parametrize("override", ["train.epochs=abc", "train.lr=fast", "data.strict=maybe", "seed=1.5"])
def test_bad_value_type(override):
    with pytest.raises(ConfigError, match="bad value") as info:
        load_config(None, [override])
    assert override.split("=")[0] in str(info.value)


@pytest.mark.parametrize(
    ("override", "valid"),
    [("train.optimizer=adam", "adamw"), ("train.schedule=linear", "cosine"), ("train.autocast=fp8", "bf16")],
)
def test_bad_choice_lists_allowed(override, valid):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as info:
        load_config(None, [override])
    assert valid in str(info.value)


def test_grad_accum_must_be_positive():
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(None, ["train.grad_accum=0"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_override_without_equals(recipe):
    with pytest.raises(ConfigError, match="key=value") as info:
        load_config(recipe, ["train.lr=0.1", "train.epochs"])
    assert "train.epochs" in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["train.epochs=abc"])


def test_to_yaml_round_trip(recipe, tmp_path):
    cfg = load_config(recipe, ["train.warmup_steps=10"])
    out = tmp_path / "resolved.yaml"
    out.write_text(to_yaml(cfg))
    again = load_config(out)
    again.run_name = cfg.run_name
    assert again == cfg


@dataclass
class _Opts:
    n: int = 1
    words: str = "x"


def test_options_from_dict():
    opts = options_from_dict(_Opts, {"n": 3}, where="method (demo)")
    assert isinstance(opts, _Opts) and opts.n == 3 and opts.words == "x"
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['m'\] for method \(demo\); valid options: n, words"):
        options_from_dict(_Opts, {"m": 3}, where="method (demo)")
    with pytest.raises(ConfigError, match=r"bad option for method \(demo\)"):
        options_from_dict(_Opts, {"n": "three"}, where="method (demo)")
