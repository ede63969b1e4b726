"""The name -> object registry behind methods, datasets and backbones."""

from __future__ import annotations

import pytest

from vlprompt.methods import METHODS
from vlprompt.registry import Registry


def test_register_get_and_sorted_names():
    reg: Registry[int] = Registry("widget")
    reg.add("zeta", 1)
    reg.add("alpha", 2)

    @reg.register("mid")
    def fn():
        return 3

    assert fn() == 3, "the decorator returns its target unchanged"
    assert reg.get("mid") is fn
    assert reg.get("alpha") == 2
    assert reg.names() == ["alpha", "mid", "zeta"]
    assert list(reg) == ["alpha", "mid", "zeta"]
    assert "zeta" in reg and "beta" not in reg


def test_duplicate_registration_raises_and_keeps_the_first():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(KeyError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(3)
    assert reg.get("a") == 1


def test_unknown_name_lists_known_names_sorted():
    reg: Registry[int] = Registry("widget")
    for name in ["b", "c", "a"]:
        reg.add(name, 0)
    with pytest.raises(KeyError, match=r"unknown widget 'd'; known: a, b, c"):
        reg.get("d")


def test_empty_registry_says_none():
    with pytest.raises(KeyError, match=r"\(none\)"):
        Registry("widget").get("x")


def test_method_registry_is_populated():
    assert {"coop", "finetune", "maple", "vpt", "zeroshot"} <= set(METHODS.names())
    with pytest.raises(KeyError, match="already registered"):
        METHODS.add("coop", object)
