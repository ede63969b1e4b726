"""Methods: one file per method, registered by name (what configs refer to)."""

# importing a method module registers it under its name
from vlprompt.methods import (  # noqa: F401
    baselines,
    captioning,
    cil,
    coda,
    continual_grounding,
    coop,
    dcp_ground,
    dgl,
    dualprompt,
    grounding,
    hide,
    itprompt,
    l2p,
    l2p_cil,
    l2p_ground,
    lpi,
    lpi_ground,
    maple,
    maple_ground,
    rlcf,
    rlcf_caption,
    rvlr,
    sprompts,
    sprompts_ground,
    tpt,
    vpt,
)
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
