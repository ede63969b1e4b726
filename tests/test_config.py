"""Typed configs: YAML + key=value overrides, with errors that say what is valid."""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path

import pytest

from vlprompt.config import Config, load_config, to_yaml
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS
from vlprompt.options import CHOICES, RANGE, Range, check_fields, options_from_dict

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


# ---- declared ranges and choices, checked at load time -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _ranged_fields(cls: type) -> list[tuple[str, Range, bool, bool]]:
    """(name, range, integer, is_sequence) of each field of ``cls`` with a declared range."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if RANGE in f.metadata:
            t = hints[f.name]
            seq = typing.get_origin(t) in (list, tuple)
            item = typing.get_args(t)[0] if seq else t
            out.append((f.name, f.metadata[RANGE], item is int, seq))
    return out


def _section_schemas() -> list[tuple[str, type]]:
    """(key prefix, dataclass) of every config section and of every method's options."""
    top = [("", Config)]
    hints = typing.get_type_hints(Config)
    sections = [(f"{name}.", t) for name, t in hints.items() if dataclasses.is_dataclass(t)]
    methods = [(f"method:{name}", METHODS.get(name).Options) for name in METHODS.names()]
    return top + sections + methods


def _is_numeric(t: typing.Any) -> bool:
    if t is bool:
        return False
    if t in (int, float):
        return True
    args = [a for a in typing.get_args(t) if a is not type(None) and a is not Ellipsis]
    return bool(args) and all(_is_numeric(a) for a in args)


@pytest.mark.parametrize(("prefix", "schema"), _section_schemas(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_field_declares_a_range(prefix, schema):
    hints = typing.get_type_hints(schema)
    undeclared = [f.name for f in dataclasses.fields(schema) if _is_numeric(hints[f.name]) and RANGE not in f.metadata]
    assert not undeclared, f"{schema.__name__}: numeric fields without a declared range: {undeclared}"


def _next_float(bound: float, towards: float) -> float:
    """The next float after ``bound``, skipping subnormals: a library that sets the CPU's denormals-are-zero flag
    (some are built with -ffast-math) makes ``5e-324 > 0`` false for the rest of the process."""
    step = math.nextafter(bound, towards)
    return math.copysign(sys.float_info.min, step) if 0 < abs(step) < sys.float_info.min else step


def _bound_cases() -> list[tuple[str, str, list[str], typing.Any, bool, str]]:
    """(id, key, extra overrides, value, accepted, range text) at every declared bound of every option."""
    cases = []
    for prefix, schema in _section_schemas():
        if prefix.startswith("method:"):
            name = prefix.split(":")[1]
            key_prefix, extra = "method.", [f"method.name={name}"]
        else:
            key_prefix, extra = prefix, []
        for field_name, rng, integer, seq in _ranged_fields(schema):
            up = (lambda b: b + 1) if integer else (lambda b: _next_float(b, math.inf))
            down = (lambda b: b - 1) if integer else (lambda b: _next_float(b, -math.inf))
            pairs = []  # (outside, inside)
            if rng.ge is not None:
                pairs.append((down(rng.ge), rng.ge))
            if rng.gt is not None:
                pairs.append((rng.gt, up(rng.gt)))
            if rng.le is not None:
                pairs.append((up(rng.le), rng.le))
            if rng.lt is not None:
                pairs.append((rng.lt, down(rng.lt)))
            for outside, inside in pairs:
                for value, ok in ((outside, False), (inside, True)):
                    if not ok and value == rng.off:
                        continue
                    value = int(value) if integer else float(value)
                    shown = [value, value] if seq else value
                    key = key_prefix + field_name
                    case_id = f"{prefix[7:]}:{key}={value}" if extra else f"{key}={value}"
                    cases.append((case_id, key, extra, shown, ok, rng.describe(integer)))
    return cases


BOUND_CASES = _bound_cases()


@pytest.mark.parametrize(("key", "extra", "value", "accepted", "allowed"), [c[1:] for c in BOUND_CASES],
                         ids=[c[0] for c in BOUND_CASES])  # fmt: skip
def test_every_bound_is_enforced_at_load(key, extra, value, accepted, allowed):
    override = f"{key}=[{', '.join(map(repr, value))}]" if isinstance(value, list) else f"{key}={value!r}"
    if accepted:
        cfg = load_config(None, [*extra, override])
        section, name = key.rsplit(".", 1) if "." in key else ("", key)
        got = cfg.method[name] if section == "method" else getattr(getattr(cfg, section) if section else cfg, name)
        assert (list(got) if isinstance(value, list) else got) == value
    else:
        with pytest.raises(ConfigError) as info:
            load_config(None, [*extra, override])
        assert str(info.value).startswith(f"{key} = ") and allowed in str(info.value)


def test_bound_cases_cover_every_section():
    keys = {c[1].split(".")[0] for c in BOUND_CASES}
    assert {"train", "data", "tta", "continual", "cil", "method", "seed"} <= keys
    assert len({c[0] for c in BOUND_CASES}) == len(BOUND_CASES)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=0", "train.batch_size = 0: must be an integer >= 1"),
        ("train.lr=-1", "train.lr = -1.0: must be a finite number > 0"),
        ("train.epochs=-1", "train.epochs = -1: must be an integer >= 0"),
        ("train.momentum=1", "train.momentum = 1.0: must be a finite number in [0, 1)"),
        ("train.betas=[0.9,1.0]", "train.betas = (0.9, 1.0): each must be a finite number in [0, 1)"),
        ("train.warmup_fraction=1.5", "train.warmup_fraction = 1.5: must be a finite number in [0, 1]"),
        ("data.max_words=2", "data.max_words = 2: must be 0 or an integer >= 3"),
        ("tta.lr=nan", "tta.lr = nan: must be a finite number > 0"),
        ("tta.momentum_m=inf", "tta.momentum_m = inf: must be a finite number in [0, 1]"),
        ("continual.task_similarity_threshold=-inf", "continual.task_similarity_threshold = -inf: must be a finite"),
        ("cil.order_seed=-2", "cil.order_seed = -2: must be an integer in [-1, 4294967295]"),
        ("seed=4294967296", "seed = 4294967296: must be an integer in [0, 4294967295]"),
    ],
)
def test_range_errors_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message)


def test_zero_means_off_or_none_where_documented():
    zeros = ["train.epochs=0", "data.max_words=0", "tta.steps=0", "train.grad_clip=0", "cil.order_seed=-1"]
    cfg = load_config(None, zeros)
    assert (cfg.train.epochs, cfg.data.max_words, cfg.tta.steps, cfg.cil.order_seed) == (0, 0, 0, -1)


def test_method_options_are_checked_at_load_time(recipe):
    with pytest.raises(ConfigError, match=r"^method\.n_ctx = 0: must be an integer >= 1"):
        load_config(recipe, ["method.n_ctx=0"])
    with pytest.raises(ConfigError, match=r"^method\.layers = \[0, -1\]: each must be an integer >= 0"):
        load_config(None, ["method.name=hide_prompt", "method.layers=[0,-1]"])
    with pytest.raises(ConfigError, match=r"method\.name = 'cooop' is not a method; known: .*coop"):
        load_config(recipe, ["method.name=cooop"])
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(recipe, ["method.n_ctxx=4"])


def test_nested_method_sections_are_checked():
    with pytest.raises(ConfigError, match=r"^method\.base\.n_ctx = 0: must be an integer >= 1"):
        load_config(None, ["method.name=rvlr", "method.base={name: coop, n_ctx: 0}"])
    with pytest.raises(ConfigError, match=r"method\.base\.name = 'nope' is not a method"):
        load_config(None, ["method.name=rvlr", "method.base={name: nope}"])
    assert load_config(None, ["method.name=rvlr", "method.base={name: coop, n_ctx: 2}"]).method["base"]["n_ctx"] == 2


def _choice_fields() -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for prefix, schema in _section_schemas():
        if not prefix.startswith("method:"):
            fields = dataclasses.fields(schema)
            out += [(prefix + f.name, f.metadata[CHOICES]) for f in fields if CHOICES in f.metadata]
    return out


@pytest.mark.parametrize(("key", "allowed"), _choice_fields(), ids=[k for k, _ in _choice_fields()])
def test_every_choice_is_enforced_with_the_allowed_values(key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=nope"])
    assert str(info.value) == f"{key} = 'nope': must be one of {', '.join(allowed)}"
    for value in allowed:
        section, name = key.split(".")
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value


def test_choice_keys_include_the_enumerated_options():
    enumerated = {"backbone.precision", "train.optimizer", "train.schedule", "train.autocast", "continual.eval_split",
                  "continual.eval_gallery", "tta.autocast", "cil.eval_split", "cil.train_transform"}  # fmt: skip
    assert enumerated <= dict(_choice_fields()).keys()


def test_check_fields_walks_nested_sections():
    cfg = Config()
    cfg.tta.views = 0
    with pytest.raises(ConfigError, match=r"^tta\.views = 0: must be an integer >= 1$"):
        check_fields(cfg)
    assert 5 in Range(ge=1) and 0 not in Range(ge=1) and 0 in Range(ge=3, off=0) and True not in Range(ge=0)


@pytest.mark.parametrize(
    "recipe_path",
    sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "world").glob("*.yaml")]),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_every_shipped_recipe_loads(recipe_path):
    cfg = load_config(recipe_path)  # every range and choice, the method's options included
    assert cfg.method["name"] in METHODS


@pytest.mark.parametrize("spelling", ["data.val=", "data.val=null", "data.val=~"])
def test_an_optional_key_is_unset_from_the_command_line(recipe, spelling):
    base = load_config(recipe, ["data.val=val.json", "continual.order=[3,1]"])
    assert base.data.val == "val.json"
    cfg = load_config(recipe, ["data.val=val.json", spelling])  # the later override unsets the earlier value
    assert cfg.data.val == ""
    assert load_config(recipe, ["continual.order=[3,1]", "continual.order="]).continual.order == []
    assert load_config(None, ["backbone.pretrained="]).backbone.pretrained is None  # optional: None
    assert load_config(None, ["backbone.pretrained=null"]).backbone.pretrained is None


def test_a_null_in_yaml_unsets_too(tmp_path):
    path = tmp_path / "template.yaml"
    path.write_text("data:\n  root: /data\n  val: null\n  test:\nmethod:\n  name: coop\n  ctx_init: null\n")
    cfg = load_config(path)
    assert (cfg.data.val, cfg.data.test, cfg.data.root) == ("", "", "/data")
    assert cfg.method == {"name": "coop", "ctx_init": None}  # method options: see the next tests


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=", "train.lr cannot be unset (train.lr= or train.lr=null): it takes a finite number > 0"),
        (
            "data.max_words=null",
            "data.max_words cannot be unset (data.max_words= or data.max_words=null): it takes 0 or",
        ),
        ("data.strict=", "data.strict cannot be unset (data.strict= or data.strict=null): it takes true or false"),
        ("train.optimizer=", "train.optimizer cannot be unset: it must be one of adamw, sgd"),
        ("train.betas=", "train.betas cannot be unset (train.betas= or train.betas=null): it takes a list, each a"),
    ],
)
def test_a_key_that_cannot_be_unset_names_what_it_takes(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message)


def test_method_options_are_unset_like_config_keys():
    cfg = load_config(None, ["method.name=coop", "method.ctx_init=a photo of a", "method.ctx_init="])
    assert cfg.method["ctx_init"] is None  # the section is kept as written; its typed options see "" below
    assert options_from_dict(METHODS.get("coop").Options, {"ctx_init": None}, where="method (coop)").ctx_init == ""
    with pytest.raises(ConfigError, match=r"^method\.n_ctx cannot be unset"):
        load_config(None, ["method.name=coop", "method.n_ctx="])
