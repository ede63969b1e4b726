"""Prefix prompts of the L2P family: plans, task-indexed prompts (query-independent, exactly frozen), DualPrompt."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone import load_backbone
from vlprompt.prompts.dualprompt import DualPromptPrompts, TaskPrefixPrompts, init_prompt, merge_plans, prefix_plan


def test_prefix_plan_maps_slots_to_layers_and_keeps_the_token_count():
    torch.manual_seed(0)
    backbone = load_backbone("vlprompt-tiny", None)
    prefix = torch.randn(2, 2, 2, 3, backbone.vision_width)  # [B, L, k|v, n, D]
    plan = prefix_plan([0, 2], prefix)
    assert set(plan.prefix) == {0, 2} and torch.equal(plan.prefix[2][1], prefix[:, 1, 1])
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        plain = backbone.vision(images, None, return_tokens=True)
        prompted = backbone.vision(images, plan, return_tokens=True)
        empty = backbone.vision(images, prefix_plan([0], prefix[:, :1, :, :0]), return_tokens=True)
    assert prompted.tokens.shape == plain.tokens.shape  # queries come only from the image tokens
    assert not torch.allclose(prompted.pooled, plain.pooled)
    torch.testing.assert_close(empty.pooled, plain.pooled, atol=1e-5, rtol=0)  # a zero-token prefix changes nothing
    with pytest.raises(ValueError, match="prefix must be"):
        prefix_plan([0, 1], prefix[:, :1])


def test_task_prompts_depend_only_on_the_task_and_freeze_exactly():
    torch.manual_seed(0)
    prompts = TaskPrefixPrompts(num_tasks=3, num_layers=2, length=4, width=8, key_dim=5)
    tasks = torch.tensor([0, 2, 2])
    out = prompts.gather(tasks)
    assert out.shape == (3, 2, 2, 4, 8)
    assert torch.equal(out[1], out[2]) and not torch.equal(out[0], out[1])  # same task, same prompt; else different
    sim = prompts.key_similarity(torch.randn(3, 5), num_seen=2).detach()
    assert sim.shape == (3, 2) and float(sim.abs().max()) <= 1.0 + 1e-6
    prompts.train_only(1)
    assert [p.requires_grad for p in prompts.prompts] == [False, True, False]
    assert [k.requires_grad for k in prompts.keys] == [False, True, False]
    before = [p.detach().clone() for p in prompts.prompts]
    prompts.gather(torch.tensor([0, 1, 2])).sum().backward()
    assert prompts.prompts[0].grad is None and prompts.prompts[1].grad is not None
    prompts.blend_with_previous(2, momentum=0.5)  # only the new prompt moves
    assert torch.equal(prompts.prompts[0], before[0]) and torch.equal(prompts.prompts[1], before[1])
    torch.testing.assert_close(prompts.prompts[2].detach(), 0.5 * before[2] + 0.25 * (before[0] + before[1]))
    prompts.copy_previous(2)
    assert torch.equal(prompts.prompts[2], prompts.prompts[1])


def test_dualprompt_concatenates_e_then_g_where_layers_coincide():
    torch.manual_seed(0)
    dual = DualPromptPrompts(num_tasks=2, g_layers=[0, 1], e_layers=[1, 2], g_length=2, e_length=3, width=8, key_dim=4)
    plan = dual.plan(torch.tensor([1, 0]))
    assert set(plan.prefix) == {0, 1, 2}
    k1, v1 = plan.prefix[1]
    assert k1.shape == (2, 5, 8)  # 3 E tokens then 2 G tokens
    assert torch.equal(k1[0, :3], dual.e.prompts[1][0, 0]) and torch.equal(k1[1, 3:], dual.g[1, 0])
    assert plan.prefix[0][0].shape[1] == 2 and plan.prefix[2][0].shape == (2, 3, 8)
    merged = merge_plans(prefix_plan([0], torch.zeros(1, 1, 2, 1, 8)), prefix_plan([0], torch.ones(3, 1, 2, 2, 8)))
    assert merged.prefix[0][0].shape == (3, 3, 8)
    assert float(init_prompt((1000,), "uniform").abs().max()) <= 1.0
    with pytest.raises(ValueError, match="unknown prompt init"):
        init_prompt((2,), "xavier")


@pytest.mark.parametrize(("how", "std"), [("normal", 0.02), ("normal:0.5", 0.5)])
def test_init_prompt_options(how: str, std: float):
    torch.manual_seed(0)
    t = init_prompt((4000,), how)
    assert abs(float(t.std()) - std) < 0.1 * std
    u = init_prompt((4000,))  # the default is L2P's / HiDe's U(-1, 1)
    assert float(u.min()) < -0.95 and float(u.max()) > 0.95 and float(u.abs().max()) <= 1.0
    assert float(init_prompt((5,), "zero").abs().sum()) == 0


def test_merge_plans_concatenates_keys_and_values_in_argument_order():
    first, second = torch.zeros(1, 1, 2, 1, 4), torch.ones(2, 1, 2, 2, 4)
    first[:, :, 1] = -1.0  # values of the first plan
    second[:, :, 1] = 2.0
    k, v = merge_plans(prefix_plan([3], first), prefix_plan([3], second)).prefix[3]
    assert k.shape == v.shape == (2, 3, 4)
    assert torch.equal(v[:, 0], torch.full((2, 4), -1.0)) and torch.equal(v[:, 1:], torch.full((2, 2, 4), 2.0))
    assert torch.equal(k[:, 0], torch.zeros(2, 4)) and torch.equal(k[:, 1:], torch.ones(2, 2, 4))


def test_task_prompts_sizes_init_and_keys():
    one = TaskPrefixPrompts(num_tasks=1, num_layers=1, length=1, width=3)  # the smallest valid size
    assert one.keys is None  # no keys unless key_dim is given
    assert one.gather(torch.tensor([0, 0])).shape == (2, 1, 2, 1, 3)
    for bad in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError, match="at least one"):
            TaskPrefixPrompts(*bad, width=3)
    zero = TaskPrefixPrompts(num_tasks=2, num_layers=1, length=2, width=3, key_dim=4, init="zero")
    assert all(float(p.detach().abs().sum()) == 0 for p in [*zero.prompts, *zero.keys])
    assert [tuple(k.shape) for k in zero.keys] == [(4,), (4,)]


def test_key_similarity_is_the_cosine_of_each_query_with_each_seen_key():
    torch.manual_seed(0)
    prompts = TaskPrefixPrompts(num_tasks=3, num_layers=1, length=1, width=2, key_dim=4)
    query = torch.randn(5, 4) * torch.tensor([[1.0], [3.0], [0.2], [2.0], [5.0]])  # rows of different norms
    sim = prompts.key_similarity(query, num_seen=2)
    want = torch.nn.functional.cosine_similarity(query[:, None], torch.stack(list(prompts.keys)[:2])[None], dim=-1)
    torch.testing.assert_close(sim, want, atol=1e-6, rtol=0)


def test_dualprompt_g_prompt_exists_only_with_layers_and_tokens():
    kw = dict(num_tasks=2, e_layers=[1], e_length=1, width=4, key_dim=3)
    assert DualPromptPrompts(g_layers=[], g_length=2, **kw).g is None
    assert DualPromptPrompts(g_layers=[0], g_length=0, **kw).g is None
    one = DualPromptPrompts(g_layers=[0], g_length=1, init="zero", **kw)
    assert one.g is not None and one.g.shape == (1, 2, 1, 4) and float(one.g.detach().abs().sum()) == 0
    assert all(float(p.detach().abs().sum()) == 0 for p in one.e.prompts)  # init reaches the E-prompts too
    assert [tuple(k.shape) for k in one.e.keys] == [(3,), (3,)]  # E-prompts have keys of key_dim


def test_copying_and_blending_start_from_the_task_just_before():
    """HiDe's ``init_from_previous`` copies prompt *and* key from task ``t - 1``; momentum blends the new prompt
    with the mean of all earlier ones; task 0 has nothing before it and is left alone by both."""
    torch.manual_seed(0)
    prompts = TaskPrefixPrompts(num_tasks=3, num_layers=1, length=2, width=3, key_dim=4, init="normal:1")
    before = [p.detach().clone() for p in prompts.prompts]
    keys = [k.detach().clone() for k in prompts.keys]
    prompts.copy_previous(0)
    prompts.blend_with_previous(0, momentum=0.5)
    assert all(torch.equal(p, b) for p, b in zip(prompts.prompts, before, strict=True))
    assert all(torch.equal(k, b) for k, b in zip(prompts.keys, keys, strict=True))
    prompts.blend_with_previous(1, momentum=0.25)
    torch.testing.assert_close(prompts.prompts[1].detach(), 0.75 * before[1] + 0.25 * before[0])
    prompts.copy_previous(1)
    assert torch.equal(prompts.prompts[1], prompts.prompts[0]) and torch.equal(prompts.keys[1], prompts.keys[0])
    with torch.no_grad():
        prompts.keys[1].add_(1.0)
    prompts.copy_previous(2)
    assert torch.equal(prompts.keys[2], prompts.keys[1]) and not torch.equal(prompts.keys[2], prompts.keys[0])
