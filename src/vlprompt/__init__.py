"""vlprompt: adapt CLIP-style vision-language models to retrieval with few trainable parameters."""

from vlprompt.backbone import Backbone, PromptPlan, load_backbone

__version__ = "0.1.0"
__all__ = ["Backbone", "PromptPlan", "load_backbone", "__version__"]
