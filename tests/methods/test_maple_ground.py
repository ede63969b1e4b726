"""MaPLe-style grounding prompts: per-layer text prompts and linear maps to the vision prompts (parameters from the
spec's formula), slice 0 inserted and deeper slices replacing, what trains, REC loss only, no interaction."""

from __future__ import annotations

import torch

from vlprompt.methods import build_method, list_methods
from vlprompt.methods.continual_grounding import TaskGroundingOptions
from vlprompt.methods.maple_ground import MaPLeGround, MaPLeGroundOptions
from vlprompt.prompts.deep import CoupledPrompts

from .ground_helpers import (
    EXPRESSIONS,
    TARGETS,
    assert_routes_by_image,
    grads,
    images,
    rec_only,
    tiny,
    trainable,
    vit_b16,
)


def _method(num_tasks: int = 2, **kw) -> MaPLeGround:
    torch.manual_seed(3)
    kw.setdefault("depth", 3)  # the tiny towers have 4 layers
    return MaPLeGround(tiny(), MaPLeGroundOptions(num_tasks=num_tasks, **kw))


def _formula(depth: int, n: int, dt: int, dv: int) -> int:
    """Spec section 7: depth (N Dt + Dt Dv + Dv)."""
    return depth * (n * dt + dt * dv + dv)


def test_defaults_are_the_reference_baseline():
    o = MaPLeGroundOptions()
    assert isinstance(o, TaskGroundingOptions)
    assert (o.depth, o.n_tokens) == (9, 16)
    assert MaPLeGround.deep_mode == "replace"
    assert "maple_ground" in list_methods()
    assert isinstance(build_method({"name": "maple_ground", "num_tasks": 2, "depth": 2}, tiny()), MaPLeGround)


def test_trainable_per_task_follows_the_spec_formula():
    m = _method(num_tasks=3)
    b = m.backbone
    assert trainable(m) == _formula(3, 16, b.text_width, b.vision_width)
    assert all(isinstance(p, CoupledPrompts) for p in m.prompts) and len(m.prompts) == 3
    # the spec's GLIP row (text 768 -> Swin 96) from the same module
    glip = CoupledPrompts(9, 16, 768, 96)
    assert sum(p.numel() for p in glip.parameters()) == _formula(9, 16, 768, 96) == 775_008


def test_vit_b16_count():
    m = MaPLeGround(vit_b16(), MaPLeGroundOptions(num_tasks=1))
    assert trainable(m) == _formula(9, 16, 512, 768) == 3_619_584


def test_vision_prompts_are_each_layers_linear_map_of_its_text_prompts():
    m = _method(n_tokens=64)
    pv, pt = m.task_prompts(1)
    assert pv.shape == (3, 64, 192) and pt.shape == (3, 64, 128)
    module = m.prompts[1]
    for layer, coupler in enumerate(module.couplers):
        torch.testing.assert_close(pv[layer], coupler(pt[layer]))
    assert torch.equal(pt[0], module.ctx()) and torch.equal(pt[1:], module.deep_text())
    assert 0.018 < float(pt.detach().std()) < 0.022  # text prompts N(0, 0.02²)


def test_slice_0_is_inserted_and_deeper_slices_replace():
    m = _method()
    pv, pt = m.task_prompts(0)
    plans = m.task_plans(0)
    assert torch.equal(plans.image.insert, pv[0]) and torch.equal(plans.text.insert, pt[0])
    assert plans.image.insert_before_ln_pre and plans.image.start is plans.text.start is None
    assert sorted(plans.image.replace) == sorted(plans.text.replace) == [1, 2]
    assert torch.equal(plans.image.replace[2], pv[2]) and torch.equal(plans.text.replace[1], pt[1])
    assert not plans.image.add and not plans.text.add
    assert m.interactions is None and m.interaction(0) is None


def test_only_the_current_tasks_prompts_train_with_the_rec_loss_alone():
    m = _method()
    m.begin_task(1)
    assert all(not p.requires_grad for p in m.prompts[0].parameters())
    assert all(p.requires_grad for p in m.prompts[1].parameters())
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)
    loss = m(imgs, tokens, TARGETS)
    torch.testing.assert_close(loss.detach(), rec_only(m, imgs, tokens))
    assert set(m.loss_terms) == {"class", "l1", "giou"}
    loss.backward()
    names = grads(m)
    assert names and all(n.startswith("prompts.1.") for n in names)
    assert any("couplers.2" in n for n in names) and any("deep_text" in n for n in names)  # every layer is used


def test_evaluation_routes_each_image_to_its_tasks_prompts():
    assert_routes_by_image(_method())
