"""Methods: parameter counts on ViT-B/16, CoOp's init, option errors, losses, gradients and training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method, list_methods

ALL_METHODS = ["coop", "finetune", "maple", "vpt", "zeroshot"]
CAPTIONS = ["a red square", "a picture of a blue circle"]


def _load(name: str) -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone(name, pretrained=None).eval()


@pytest.fixture(scope="module")
def vit_b16() -> vlprompt.Backbone:
    """Shared random ViT-B/16; every method freezes it again when built, so order does not matter."""
    return _load("ViT-B-16")


@pytest.fixture(scope="module")
def tiny_shared() -> vlprompt.Backbone:
    """Tiny backbone for read-only tests (nothing trains it)."""
    return _load("vlprompt-tiny")


@pytest.fixture
def tiny() -> vlprompt.Backbone:
    """Fresh tiny backbone for tests that train."""
    return _load("vlprompt-tiny")


def _batch(bb: vlprompt.Backbone) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, bb.image_size, bb.image_size)


def test_registered_methods():
    assert set(ALL_METHODS) <= set(list_methods())
    assert list_methods() == sorted(list_methods())


@pytest.mark.parametrize(
    ("section", "trainable"),
    [
        ({"name": "coop", "n_ctx": 4}, 4 * 512),
        ({"name": "maple"}, 3_555_072),  # MaPLe paper: 3.55M
        ({"name": "vpt", "n_tokens": 10, "depth": 12}, 12 * 10 * 768),
        ({"name": "vpt", "n_tokens": 10, "depth": 1}, 10 * 768),
        ({"name": "zeroshot"}, 0),
    ],
)
def test_parameter_counts_vit_b16(vit_b16, section, trainable):
    counts = build_method(section, vit_b16).parameter_counts()
    assert counts["trainable"] == trainable
    assert counts["total"] == 149_620_737 + trainable  # frozen ViT-B/16 (DGL spec) + the prompts


def test_finetune_trains_everything(vit_b16):
    method = build_method({"name": "finetune"}, vit_b16)
    counts = method.parameter_counts()
    assert counts["trainable"] == counts["total"] == 149_620_737
    frozen_scale = build_method({"name": "finetune", "train_logit_scale": False}, vit_b16).parameter_counts()
    assert frozen_scale["trainable"] == 149_620_737 - 1
    # building another method freezes the shared backbone again
    assert build_method({"name": "zeroshot"}, vit_b16).parameter_counts()["trainable"] == 0


def test_finetune_one_tower(tiny_shared):
    method = build_method({"name": "finetune", "tower": "vision", "train_logit_scale": False}, tiny_shared)
    visual = sum(p.numel() for p in tiny_shared.model.visual.parameters())
    assert method.parameter_counts()["trainable"] == visual
    assert not tiny_shared.model.token_embedding.weight.requires_grad
    with pytest.raises(ValueError, match="tower"):
        build_method({"name": "finetune", "tower": "neither"}, tiny_shared)


def test_finetune_text_tower_trains_all_text_weights(tiny_shared):
    model = tiny_shared.model
    method = build_method({"name": "finetune", "tower": "text", "train_logit_scale": False}, tiny_shared)
    text = [p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert model.positional_embedding.requires_grad and model.text_projection.requires_grad
    assert method.parameter_counts()["trainable"] == sum(p.numel() for p in text)


def test_coop_context_initialised_from_words(tiny_shared):
    method = build_method({"name": "coop", "n_ctx": 4, "ctx_init": "a photo of a"}, tiny_shared)
    ids = tiny_shared.tokenize(["a photo of a"])[0, 1:5]
    expected = tiny_shared.model.token_embedding.weight[ids]
    assert torch.equal(method.context.ctx.data, expected)
    # placeholders whose embeddings are replaced by "a photo of a" give exactly CLIP's "a photo of a dog"
    with torch.no_grad():
        ours = method.encode_text(["dog", "red square"])
        clip = F.normalize(
            tiny_shared.model.encode_text(tiny_shared.tokenize(["a photo of a dog", "a photo of a red square"])),
            dim=-1,
        )
    assert (ours - clip).abs().max() <= 1e-5
    tokens = method.tokenize(["dog"])[0]
    assert len(set(tokens[1:5].tolist())) == 1 and tokens[5] != tokens[1]


def test_coop_random_init_when_no_words(tiny_shared):
    torch.manual_seed(0)
    method = build_method({"name": "coop", "n_ctx": 3, "ctx_init": ""}, tiny_shared)
    assert method.context.ctx.shape == (3, tiny_shared.text_width)
    assert method.context.ctx.std().item() == pytest.approx(0.02, rel=0.25)


def test_unknown_option_lists_valid_options(tiny_shared):
    with pytest.raises(ConfigError, match="n_ctxx") as info:
        build_method({"name": "coop", "n_ctxx": 4}, tiny_shared)
    assert "n_ctx" in str(info.value).split("valid options")[1] and "ctx_init" in str(info.value)


def test_bad_option_type_is_config_error(tiny_shared):
    with pytest.raises(ConfigError, match="coop"):
        build_method({"name": "coop", "n_ctx": "four"}, tiny_shared)


def test_unknown_method_lists_names(tiny_shared):
    with pytest.raises(ConfigError, match="'cooop' is not a method") as info:
        build_method({"name": "cooop"}, tiny_shared)
    for name in ALL_METHODS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="needs a name"):
        build_method({"n_ctx": 4}, tiny_shared)


def test_vpt_depth_out_of_range(tiny_shared):
    with pytest.raises(ValueError, match="vpt.depth"):
        build_method({"name": "vpt", "depth": tiny_shared.vision.num_layers + 1}, tiny_shared)


def test_maple_depth_capped_at_tower_depth(tiny_shared):
    method = build_method({"name": "maple", "depth": 9}, tiny_shared)
    assert method.prompts.depth == tiny_shared.vision.num_layers == 4
    plans = method.plans()
    assert sorted(plans.text.replace) == [0, 1, 2, 3]
    assert sorted(plans.image.replace) == [1, 2, 3] and plans.image.insert_before_ln_pre


def test_zeroshot_encoders_equal_normalised_backbone(tiny_shared):
    method = build_method({"name": "zeroshot"}, tiny_shared)
    images = _batch(tiny_shared)
    with torch.no_grad():
        img = method.encode_image(images)
        txt = method.encode_text(CAPTIONS)
        ref_img = F.normalize(tiny_shared.model.encode_image(images), dim=-1)
        ref_txt = F.normalize(tiny_shared.model.encode_text(tiny_shared.tokenize(CAPTIONS)), dim=-1)
    assert (img - ref_img).abs().max() <= 1e-5
    assert (txt - ref_txt).abs().max() <= 1e-5
    assert method.trainable_parameters() == []
    assert method.trainable_state_dict() == {}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_forward_loss_and_gradients_only_on_trainable(tiny, name):
    method = build_method({"name": name}, tiny)
    loss = method(_batch(tiny), method.tokenize(CAPTIONS))
    assert loss.dim() == 0 and torch.isfinite(loss)
    trainable = {id(p) for p in method.trainable_parameters()}
    named = dict(method.named_parameters())
    assert set(method.trainable_state_dict()) == {n for n, p in named.items() if p.requires_grad}
    if name == "zeroshot":
        assert not trainable and not loss.requires_grad
        return
    assert trainable
    loss.backward()
    for pname, p in named.items():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize("section", [{"name": "vpt", "n_tokens": 3}, {"name": "maple", "n_ctx": 2, "depth": 3}])
def test_every_prompt_layer_receives_gradient(tiny, section):
    """Deep prompts: each layer's tokens enter the towers (insert at 0, replace at 1..depth-1)."""
    method = build_method(section, tiny)
    method(_batch(tiny), method.tokenize(CAPTIONS)).backward()
    deep = method.prompts if section["name"] == "vpt" else method.prompts.deep_text
    per_layer = deep.tokens.grad.flatten(1).abs().sum(dim=1)
    expected_layers = tiny.vision.num_layers if section["name"] == "vpt" else section["depth"] - 1
    assert per_layer.shape == (expected_layers,)
    assert (per_layer > 0).all(), per_layer
    if section["name"] == "maple":
        for coupler in method.prompts.couplers:
            assert coupler.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_METHODS[:-1])
def test_training_step_changes_only_trainable_tensors(tiny, name):
    method = build_method({"name": name}, tiny)
    before = {k: v.detach().clone() for k, v in method.state_dict().items()}
    trainable = set(method.trainable_state_dict())
    assert trainable
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    images = _batch(tiny)
    loss = method(images, method.tokenize(CAPTIONS))
    loss.backward()
    optimizer.step()
    after = method.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    names = dict(method.named_parameters())
    # state_dict also holds aliases (backbone.vision.visual.* is backbone.model.visual.*): compare by tensor
    trainable_ids = {id(names[k]) for k in trainable}
    for key in changed:
        tensor = method.state_dict(keep_vars=True)[key]
        assert id(tensor) in trainable_ids, f"{key} changed but is not trainable"
    for key in trainable:
        assert key in changed, f"{key} did not change"


def test_vpt_deep_inserts_layer_0_tokens_after_ln_pre_and_replaces_them_at_every_later_layer(tiny_shared):
    """VPT-deep: slice 0 inserted (after ``ln_pre``, after CLS), slice l replaces the prompt span before block l for
    every l in 1..depth-1 (replace, not add); text untouched. ``depth=1`` is VPT-shallow."""
    layers = tiny_shared.vision.num_layers
    method = build_method({"name": "vpt", "n_tokens": 3}, tiny_shared)
    plans = method.plans()
    tokens = method.prompts.tokens
    assert plans.text is None
    image = plans.image
    assert torch.equal(image.insert, tokens[0]) and image.start is None and not image.insert_before_ln_pre
    assert sorted(image.replace) == list(range(1, layers)) and not image.add
    for layer in range(1, layers):
        assert torch.equal(image.replace[layer], tokens[layer])
    shallow = build_method({"name": "vpt", "n_tokens": 3, "depth": 1}, tiny_shared).plans().image
    assert shallow.insert.shape == (3, tiny_shared.vision_width) and not shallow.replace


def test_coop_replaces_the_placeholder_words_at_text_layer_0_only(tiny_shared):
    method = build_method({"name": "coop", "n_ctx": 3, "ctx_init": ""}, tiny_shared)
    plans = method.plans()
    assert plans.image is None and method.n_placeholders == 3
    assert list(plans.text.replace) == [0] and plans.text.insert is None and not plans.text.add
    assert torch.equal(plans.text.replace[0], method.context.ctx) and plans.text.start is None


def test_maple_couples_each_layers_vision_prompts_to_its_text_prompts(tiny_shared):
    """MaPLe: text prompts replace the context at layers 0..J-1; vision prompts W_l t_l + b_l are inserted before
    ``ln_pre`` at layer 0 and replace the span at layers 1..J-1."""
    depth = min(tiny_shared.vision.num_layers, tiny_shared.text.num_layers)
    method = build_method({"name": "maple", "n_ctx": 2, "depth": depth, "ctx_init": ""}, tiny_shared)
    plans = method.plans()
    text, vision = plans.text, plans.image
    assert sorted(text.replace) == list(range(depth)) and text.insert is None
    assert vision.insert_before_ln_pre and sorted(vision.replace) == list(range(1, depth))
    texts = [method.prompts.ctx.ctx, *method.prompts.deep_text.tokens]
    for layer in range(depth):
        assert torch.equal(text.replace[layer], texts[layer])
        coupled = method.prompts.couplers[layer](texts[layer])
        got = vision.insert if layer == 0 else vision.replace[layer]
        assert torch.allclose(got, coupled, atol=1e-6)
