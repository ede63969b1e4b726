"""``import vlprompt``: the public API builds configs and models exactly as the commands do."""

from __future__ import annotations

import torch

import vlprompt
from vlprompt.config import load_config
from vlprompt.core.factory import build_model

OVERRIDES = ["method.name=coop", "method.n_ctx=3", "backbone.pretrained=null", "data.max_words=7"]


def test_every_public_name_exists() -> None:
    assert all(hasattr(vlprompt, name) for name in vlprompt.__all__)
    assert {"load_config", "build_model", "from_pretrained", "load_backbone"} <= set(vlprompt.__all__)


def test_load_config_is_the_config_loader() -> None:
    cfg = vlprompt.load_config(None, OVERRIDES)
    assert cfg == load_config(None, OVERRIDES)
    assert cfg.method["n_ctx"] == 3 and cfg.backbone.pretrained is None
    assert vlprompt.load_config() == load_config()


def test_build_model_is_the_factory() -> None:
    cfg = vlprompt.load_config(None, OVERRIDES)
    torch.manual_seed(0)
    ours = vlprompt.build_model(cfg, "cpu")
    torch.manual_seed(0)
    factory = build_model(cfg, torch.device("cpu"))
    assert type(ours).__name__ == "CoOp" and ours.max_words == 7
    assert ours.parameter_counts() == factory.parameter_counts()
    assert ours.parameter_counts()["trainable"] == 3 * ours.backbone.model.token_embedding.weight.shape[1]
    theirs = factory.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in ours.state_dict().items())
