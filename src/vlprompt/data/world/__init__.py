"""The embedded world: a small deterministic benchmark of images, videos, captions, classes and domains.

``build_world(out, seed, size)`` writes it in the real formats (Karpathy/ALBEF JSON, CLIP4Clip MSR-VTT files,
ImageFolder trees, task splits, MDETR referring-expression files); ``layout`` says where each file lives.
"""

from vlprompt.data.world import layout
from vlprompt.data.world.build import WORLD_SIZES, build_world, class_list, item_seed, plan_world, verify_world
from vlprompt.data.world.layout import DOMAINS, SHIFTED_DOMAINS
from vlprompt.data.world.scenes import ObjectSpec, SceneSpec, caption_for, captions_for, sample_scene
from vlprompt.data.world.settings import SETTINGS, Backdrop, Setting, setting_for
from vlprompt.data.world.video import Step, VideoSpec, caption_for_video, reverse_video, sample_video
from vlprompt.data.world.vocabulary import WORLD_VERSION

__all__ = [
    "DOMAINS",
    "SETTINGS",
    "SHIFTED_DOMAINS",
    "Backdrop",
    "WORLD_SIZES",
    "WORLD_VERSION",
    "ObjectSpec",
    "SceneSpec",
    "Setting",
    "Step",
    "VideoSpec",
    "build_world",
    "caption_for",
    "caption_for_video",
    "captions_for",
    "class_list",
    "item_seed",
    "layout",
    "plan_world",
    "reverse_video",
    "sample_scene",
    "sample_video",
    "setting_for",
    "verify_world",
]
