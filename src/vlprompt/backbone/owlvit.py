"""Import OWL-ViT / OWLv2 checkpoints (``transformers`` format) into a :class:`~vlprompt.backbone.detector.Detector`.

``transformers``' ``OwlViTForObjectDetection`` / ``Owlv2ForObjectDetection`` hold a CLIP (``owlvit.`` / ``owlv2.``
prefix) and the heads. The CLIP maps key by key onto an open_clip ``CLIP`` built from the checkpoint's config
(:func:`owl_clip_config`): separate ``q/k/v_proj`` become ``in_proj_weight``, ``fc1/fc2`` become ``c_fc/c_proj``,
the bias-free ``visual_projection`` / ``text_projection`` Linears become open_clip's ``proj`` /
``text_projection`` matrices (transposed). OWL-ViT's text tower is CLIP's (causal attention, pooled at the argmax
token id = end-of-text); both towers use ``quick_gelu`` in the released v1 and v2 checkpoints (read from the
config's ``hidden_act``). The heads keep ``transformers``' names (``class_head.*``, ``box_head.*``, ``layer_norm.*``,
OWLv2's ``objectness_head.*``). Every tensor of the checkpoint must be used and every tensor of ours filled, or it
is an error naming the keys.

``transformers`` is an optional dependency (extra ``ground``), imported only inside :func:`load_owlvit`, and nothing
downloads unless ``local_files_only=False`` is passed explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import Tensor, nn

from vlprompt.backbone.backbone import Backbone
from vlprompt.backbone.detector import Detector
from vlprompt.errors import WeightsUnavailableError

#: Model types of the ``transformers`` configs this module reads.
OWL_TYPES = ("owlvit", "owlv2")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> open_clip's quick_gelu flag
#: open_clip block names <- OWL encoder-layer names (besides q/k/v, which are concatenated).
_BLOCK_NAMES = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
_HEAD_PREFIXES = ("class_head.", "box_head.", "layer_norm.", "objectness_head.")


def _as_dict(config: Any) -> dict[str, Any]:
    """A ``transformers`` OWL config (object or ``to_dict()``) as a plain dict with sub-config dicts."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for part in ("text_config", "vision_config"):
        sub = d.get(part)
        d[part] = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub or {})
    return d


def _side(image_size: Any) -> int:
    if isinstance(image_size, list | tuple):
        if len(set(image_size)) != 1:
            raise WeightsUnavailableError(f"OWL checkpoints with non-square inputs are not supported: {image_size}")
        return int(image_size[0])
    return int(image_size)


def owl_clip_config(config: Any) -> tuple[int, CLIPVisionCfg, CLIPTextCfg, bool]:
    """``(embed_dim, vision_cfg, text_cfg, quick_gelu)`` of the open_clip CLIP matching an OWL config."""
    d = _as_dict(config)
    model_type = d.get("model_type", "owlvit")
    if model_type not in OWL_TYPES:
        raise WeightsUnavailableError(f"not an OWL-ViT / OWLv2 config (model_type {model_type!r})")
    t, v, embed = d["text_config"], d["vision_config"], int(d["projection_dim"])
    acts = {t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise WeightsUnavailableError(
            f"OWL towers with activations {sorted(acts)} cannot be mapped to open_clip "
            f"(one of {sorted(_ACTIVATIONS)} in both towers)"
        )
    for name, part in (("text", t), ("vision", v)):
        if abs(float(part.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
            raise WeightsUnavailableError(f"OWL {name} layer_norm_eps {part['layer_norm_eps']} != open_clip's 1e-5")
    if int(t["hidden_size"]) != embed:  # transformers' class head projects to the text width, scored in embed space
        raise WeightsUnavailableError(
            f"OWL text width {t['hidden_size']} != projection_dim {embed}: its class head "
            "would not match the query embeddings"
        )
    vw, tw = int(v["hidden_size"]), int(t["hidden_size"])
    vision = CLIPVisionCfg(
        layers=int(v["num_hidden_layers"]),
        width=vw,
        head_width=vw // int(v["num_attention_heads"]),
        mlp_ratio=int(v["intermediate_size"]) / vw,
        patch_size=_side(v["patch_size"]),
        image_size=_side(v["image_size"]),
    )
    text = CLIPTextCfg(
        context_length=int(t["max_position_embeddings"]),
        vocab_size=int(t["vocab_size"]),
        width=tw,
        heads=int(t["num_attention_heads"]),
        layers=int(t["num_hidden_layers"]),
        mlp_ratio=int(t["intermediate_size"]) / tw,
    )
    return embed, vision, text, _ACTIVATIONS[acts.pop()]


def _tower_keys(src: str, dst: str, layers: int, sd: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    """Move one tower's encoder layers from OWL names (``src``) to open_clip's (``dst``), consuming ``sd``."""
    for i in range(layers):
        a, b = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{a}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{b}attn.in_proj_{kind}"] = torch.cat(qkv)
            for ours, theirs in _BLOCK_NAMES:
                out[f"{b}{ours}.{kind}"] = sd.pop(f"{a}{theirs}.{kind}")


def owl_to_open_clip(state_dict: Mapping[str, Tensor], vision_layers: int, text_layers: int) -> tuple[dict, dict]:
    """Split an OWL detection state dict into open_clip CLIP tensors and head tensors (our names).

    Raises :class:`WeightsUnavailableError` naming missing or unused keys.
    """
    prefix = next((f"{p}." for p in OWL_TYPES if any(k.startswith(f"{p}.") for k in state_dict)), None)
    if prefix is None:
        raise WeightsUnavailableError("not an OWL-ViT / OWLv2 detection state dict (no 'owlvit.' or 'owlv2.' keys)")
    sd = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    heads = {k: v for k, v in state_dict.items() if k.startswith(_HEAD_PREFIXES)}
    left = set(state_dict) - {prefix + k for k in sd} - set(heads)
    clip: dict[str, Tensor] = {}
    try:
        tv, tt = "vision_model", "text_model"
        clip["visual.class_embedding"] = sd.pop(f"{tv}.embeddings.class_embedding")
        clip["visual.conv1.weight"] = sd.pop(f"{tv}.embeddings.patch_embedding.weight")
        clip["visual.positional_embedding"] = sd.pop(f"{tv}.embeddings.position_embedding.weight")
        clip["token_embedding.weight"] = sd.pop(f"{tt}.embeddings.token_embedding.weight")
        clip["positional_embedding"] = sd.pop(f"{tt}.embeddings.position_embedding.weight")
        for kind in ("weight", "bias"):
            clip[f"visual.ln_pre.{kind}"] = sd.pop(f"{tv}.pre_layernorm.{kind}")
            clip[f"visual.ln_post.{kind}"] = sd.pop(f"{tv}.post_layernorm.{kind}")
            clip[f"ln_final.{kind}"] = sd.pop(f"{tt}.final_layer_norm.{kind}")
        clip["visual.proj"] = sd.pop("visual_projection.weight").T.contiguous()
        clip["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
        clip["logit_scale"] = sd.pop("logit_scale")
        _tower_keys(tv, "visual.transformer", vision_layers, sd, clip)
        _tower_keys(tt, "transformer", text_layers, sd, clip)
    except KeyError as err:
        raise WeightsUnavailableError(f"OWL checkpoint lacks tensor {prefix}{err.args[0]}") from err
    left |= {prefix + k for k in sd if not k.endswith("position_ids")}  # position_ids: index buffers, not weights
    if left:
        raise WeightsUnavailableError(f"OWL checkpoint has tensors this mapping does not use: {sorted(left)[:8]}")
    return clip, heads


def _transformers_model(source: str | Path, local_files_only: bool) -> nn.Module:
    """``Owl*ForObjectDetection.from_pretrained(source)`` or a clear error (nothing downloads by default)."""
    try:
        import transformers
    except ImportError as err:
        raise WeightsUnavailableError(
            "importing OWL-ViT checkpoints needs the optional dependency transformers (pip install 'vlprompt[ground]')"
        ) from err
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), local_files_only=local_files_only)
        classes = {"owlvit": transformers.OwlViTForObjectDetection, "owlv2": transformers.Owlv2ForObjectDetection}
        if config.model_type not in classes:
            raise WeightsUnavailableError(f"{source} holds a {config.model_type!r} model, not OWL-ViT / OWLv2")
        return classes[config.model_type].from_pretrained(str(source), local_files_only=local_files_only)
    except WeightsUnavailableError:
        raise
    except Exception as err:  # transformers reports a missing folder, file or cache entry with several types
        where = "a local folder or the Hugging Face cache" if local_files_only else "the Hugging Face Hub"
        raise WeightsUnavailableError(
            f"could not load the OWL checkpoint {source} from {where} ({type(err).__name__}: {err}). Download it on a "
            "machine with internet (e.g. `huggingface-cli download google/owlvit-base-patch32 --local-dir DIR`), "
            "copy DIR here and pass its path"
        ) from err


def load_owlvit(
    source: str | Path | nn.Module | Mapping[str, Tensor],
    config: Any = None,
    device: str | torch.device = "cpu",
    local_files_only: bool = True,
) -> Detector:
    """An OWL-ViT / OWLv2 checkpoint as a :class:`Detector` on open_clip towers (float32, eval mode).

    ``source``: a folder or Hub id read with ``from_pretrained`` (the local cache only unless
    ``local_files_only=False``), a ``transformers`` detection model, or its state dict together with ``config``
    (the ``transformers`` config object or its ``to_dict()``). The backbone's tokenizer is CLIP's BPE with the
    checkpoint's context length (16 for the released models); its transforms squash images to the square input
    (OWL-ViT's preprocessing; OWLv2 pads to a square first, which the data pipeline must do before).
    """
    if isinstance(source, str | Path):
        source = _transformers_model(source, local_files_only)
    if isinstance(source, nn.Module):
        config = config if config is not None else source.config
        source = source.state_dict()
    if config is None:
        raise WeightsUnavailableError("load_owlvit(state_dict) needs the checkpoint's config")
    embed, vision_cfg, text_cfg, quick_gelu = owl_clip_config(config)
    model = CLIP(embed, vision_cfg, text_cfg, quick_gelu=quick_gelu)
    clip, heads = owl_to_open_clip(source, vision_cfg.layers, text_cfg.layers)
    try:
        model.load_state_dict(clip, strict=True)
    except RuntimeError as err:  # shape mismatch between the config and the tensors
        raise WeightsUnavailableError(f"OWL checkpoint tensors do not fit its config: {err}") from err
    transform = open_clip.image_transform(vision_cfg.image_size, is_train=False, resize_mode="squash")
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.context_length)
    model_type = _as_dict(config).get("model_type", "owlvit")
    backbone = Backbone(model, tokenizer, transform, transform, name=model_type, pretrained=None)
    eps = float(_as_dict(config)["vision_config"].get("layer_norm_eps", 1e-5))
    detector = Detector(backbone, objectness=any(k.startswith("objectness_head.") for k in heads), layer_norm_eps=eps)
    ours = {k for k in detector.state_dict() if not k.startswith("backbone.")}
    if missing := sorted(ours - set(heads)):
        raise WeightsUnavailableError(f"OWL checkpoint lacks head tensors {missing[:8]}")
    if unused := sorted(set(heads) - ours):
        raise WeightsUnavailableError(f"OWL checkpoint has head tensors this detector does not use: {unused[:8]}")
    try:
        detector.load_state_dict(heads, strict=False)
    except RuntimeError as err:
        raise WeightsUnavailableError(f"OWL head tensors do not fit: {err}") from err
    backbone.freeze()
    return detector.to(device).eval()
