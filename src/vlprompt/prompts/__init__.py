"""Prompt modules: ``nn.Module``s that produce prompt tensors. Pure tensor code, no I/O."""

from vlprompt.prompts.deep import CoupledPrompts, DeepPrompts, TextContext, vpt_init_range

__all__ = ["CoupledPrompts", "DeepPrompts", "TextContext", "vpt_init_range"]
