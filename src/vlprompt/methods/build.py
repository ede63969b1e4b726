"""Build a method from its config section (``{name: ..., option: value}``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vlprompt.backbone import Backbone
from vlprompt.config import options_from_dict
from vlprompt.methods.base import METHODS, Method


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def option_names(name: str) -> set[str]:
    """The option names of method ``name`` (empty for an unknown name; building it reports the error)."""
    return {f.name for f in dataclasses.fields(METHODS.get(name).Options)} if name in METHODS else set()


def build_method(section: Mapping[str, Any], backbone: Backbone) -> Method:
    """Instantiate the method named in ``section`` with its typed, validated options."""
    section = dict(section)
    name = section.pop("name", None)
    if not name:
        raise ValueError("the method section needs a name, one of: " + ", ".join(list_methods()))
    cls = METHODS.get(name)
    options = options_from_dict(cls.Options, section, where=f"method ({name})")
    return cls(backbone, options)
