"""S-Prompts for grounding: per-task full-rank depth-1 prompts (parameters from the shapes, N(0, 0.02²)), where they
enter, what trains, REC loss only, image routing."""

from __future__ import annotations

import torch

from vlprompt.methods import build_method, list_methods
from vlprompt.methods.continual_grounding import TaskGroundingMethod, TaskGroundingOptions
from vlprompt.methods.sprompts_ground import SPromptsGround, SPromptsGroundOptions
from vlprompt.prompts.lpi import FullRankPrompt

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


def _method(num_tasks: int = 2, **kw) -> SPromptsGround:
    torch.manual_seed(3)
    return SPromptsGround(tiny(), SPromptsGroundOptions(num_tasks=num_tasks, **kw))


def test_defaults_are_the_reference_baseline():
    o = SPromptsGroundOptions()
    assert isinstance(o, TaskGroundingOptions)
    assert (o.n_tokens, o.depth, o.init_std, o.n_keys) == (16, 1, 0.02, 5)
    assert o.insert_before_ln_pre
    assert "sprompts_ground" in list_methods()
    m = build_method({"name": "sprompts_ground", "num_tasks": 3}, tiny())
    assert isinstance(m, SPromptsGround) and isinstance(m, TaskGroundingMethod) and m.num_tasks == 3


def test_trainable_per_task_is_n_times_both_widths():
    m = _method(num_tasks=3)
    b = m.backbone
    per_task = 16 * (b.vision_width + b.text_width)
    assert trainable(m) == per_task  # only the current task's pair
    assert all(isinstance(p, FullRankPrompt) for p in m.prompts) and len(m.prompts) == 3
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in m.detector.parameters()) == 3 * per_task
    assert m.interactions is None and m.interaction(0) is None


def test_vit_b16_count_is_the_spec_row():
    m = SPromptsGround(vit_b16(), SPromptsGroundOptions(num_tasks=1))
    assert trainable(m) == 20_480  # spec section 7: N (Dv + Dt) = 16 (768 + 512)


def test_prompts_start_at_std_002():
    pv, pt = _method(n_tokens=64).task_prompts(0)
    assert pv.shape == (1, 64, 192) and pt.shape == (1, 64, 128)
    for p in (pv, pt):
        assert 0.018 < float(p.detach().std()) < 0.022 and abs(float(p.detach().mean())) < 0.002


def test_slice_0_is_inserted_after_the_first_token_of_both_towers():
    m = _method()
    pv, pt = m.task_prompts(1)
    plans = m.task_plans(1)
    assert torch.equal(plans.image.insert, pv[0]) and torch.equal(plans.text.insert, pt[0])
    assert plans.image.start is plans.text.start is None and plans.image.insert_before_ln_pre
    assert not plans.image.add and not plans.image.replace and not plans.text.add and not plans.text.replace
    deeper = _method(depth=3).task_plans(0)  # depth > 1 adds the deeper free slices
    assert sorted(deeper.image.add) == [1, 2] and not deeper.image.replace


def test_only_the_current_tasks_prompts_train_with_the_rec_loss_alone():
    m = _method(num_tasks=3)
    m.begin_task(2)
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)
    assert [any(p.requires_grad for p in q.parameters()) for q in m.prompts] == [False, False, True]
    loss = m(imgs, tokens, TARGETS)
    torch.testing.assert_close(loss.detach(), rec_only(m, imgs, tokens))
    assert set(m.loss_terms) == {"class", "l1", "giou"}
    loss.backward()
    assert grads(m) == {"prompts.2.vision", "prompts.2.text"}


def test_evaluation_routes_each_image_to_its_tasks_prompts():
    assert_routes_by_image(_method())
