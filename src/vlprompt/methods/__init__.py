"""Methods: one file per method, registered by name (what configs refer to)."""

from vlprompt.methods import baselines, coop, dgl, maple, vpt  # noqa: F401  (registration)
from vlprompt.methods.base import METHODS, Method, MethodOptions, Plans, register_method
from vlprompt.methods.build import build_method, list_methods, option_names

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "Plans",
    "register_method",
    "build_method",
    "list_methods",
    "option_names",
]
