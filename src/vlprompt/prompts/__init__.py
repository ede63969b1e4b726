"""Prompt modules: ``nn.Module``s that produce prompt tensors. Pure tensor code, no I/O."""

from vlprompt.prompts.deep import CoupledPrompts, DeepPrompts, TextContext, vpt_init_range
from vlprompt.prompts.dgl import DGLLinearPrompts, DGLPrompts, DGLTransformerPrompts

__all__ = [
    "CoupledPrompts",
    "DeepPrompts",
    "DGLLinearPrompts",
    "DGLPrompts",
    "DGLTransformerPrompts",
    "TextContext",
    "vpt_init_range",
]
