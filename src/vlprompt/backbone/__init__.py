"""Backbones: open_clip models with promptable towers. The only package that touches open_clip internals."""

from vlprompt.backbone.backbone import Backbone, load_backbone
from vlprompt.backbone.loading import EMBEDDED_MODELS, available_backbones, embedded_weights_path
from vlprompt.backbone.plan import PromptPlan
from vlprompt.backbone.towers import TextTower, TowerOutput, VisionTower

__all__ = [
    "Backbone",
    "load_backbone",
    "EMBEDDED_MODELS",
    "available_backbones",
    "embedded_weights_path",
    "PromptPlan",
    "TextTower",
    "TowerOutput",
    "VisionTower",
]
