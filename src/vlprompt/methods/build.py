"""Build a method from its config section (``{name: ..., option: value}``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from vlprompt.backbone import Backbone
from vlprompt.errors import ConfigError
from vlprompt.methods.base import METHODS, Method
from vlprompt.options import options_from_dict

#: Field metadata of an option that is itself a method section (e.g. RVLR's ``base``), validated the same way.
METHOD_SECTION = "method_section"


def method_section(factory: Callable[[], dict[str, Any]]) -> Any:
    """An ``Options`` field holding a nested method section (``{name: ..., option: value}``)."""
    return dataclasses.field(default_factory=factory, metadata={METHOD_SECTION: True})


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def option_names(name: str) -> set[str]:
    """The option names of method ``name`` (empty for an unknown name; building it reports the error)."""
    return {f.name for f in dataclasses.fields(METHODS.get(name).Options)} if name in METHODS else set()


def method_options(section: Mapping[str, Any], key: str = "method") -> tuple[type[Method], Any]:
    """The method class named in ``section`` and its typed options, every declared range and choice checked,
    nested method sections included (``key`` names the section in errors)."""
    section = dict(section)
    name = section.pop("name", None)
    if not name:
        raise ConfigError(f"{key} needs a name, one of: " + ", ".join(list_methods()))
    if name not in METHODS:
        raise ConfigError(f"{key}.name = {name!r} is not a method; known: {', '.join(list_methods())}")
    cls = METHODS.get(name)
    options = options_from_dict(cls.Options, section, where=f"{key} ({name})", prefix=f"{key}.")
    for f in dataclasses.fields(options):
        if f.metadata.get(METHOD_SECTION):
            method_options(getattr(options, f.name), f"{key}.{f.name}")
    return cls, options


def build_method(section: Mapping[str, Any], backbone: Backbone) -> Method:
    """Instantiate the method named in ``section`` with its typed, validated options."""
    cls, options = method_options(section)
    return cls(backbone, options)
