"""LPI for grounding: parameters per task from the shapes, where prompts enter, the interaction's layers and token
positions, the loss terms and their constants, what trains, and routing by the image at evaluation."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.methods import build_method, list_methods
from vlprompt.methods.continual_grounding import TaskGroundingMethod, grounding_plans
from vlprompt.methods.grounding import normalized_targets, rec_loss
from vlprompt.methods.lpi import layer_alignment_loss, task_contrast_loss
from vlprompt.methods.lpi_ground import LPIGround, LPIGroundOptions

from .ground_helpers import assert_routes_by_image

TARGETS = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.3, 0.4]])


def _tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 64, 64)


def _method(num_tasks: int = 2, **kw) -> LPIGround:
    torch.manual_seed(3)
    kw.setdefault("depth", 4)
    kw.setdefault("layers", 4)
    return LPIGround(_tiny(), LPIGroundOptions(num_tasks=num_tasks, **kw))


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_defaults_are_lpis_grounding_settings():
    o = LPIGroundOptions()
    assert (o.depth, o.layers, o.rank, o.n_tokens, o.interact_rank) == (9, 9, 4, 16, 4)
    assert o.interact and o.interact_mix == 0.1 and o.init_std == 0.5
    assert (o.align_weight, o.align_temperature, o.align_normalize) == (0.1, 0.01, True)
    assert (o.task_weight, o.task_temperature, o.double_sigmoid) == (0.1, 0.01, False)
    assert o.n_keys == 5 and o.insert_before_ln_pre
    assert "lpi_ground" in list_methods()


def test_trainable_parameters_per_task_follow_the_spec_formulas():
    m = _method()
    b = m.backbone
    dv, dt, towers, o = b.vision_width, b.text_width, 4, m.options
    prompts = o.rank * (o.layers + 2 * o.n_tokens + dv + dt)
    interaction = 2 * o.interact_rank * (towers + dv + dt + 1) + 2 * (dv + dt)
    assert _trainable(m) == prompts + interaction
    # the spec's numbers at ViT-B/16 (L = 9 prompt slices, 12 tower layers, 768 / 512 wide, r = 4, N = 16)
    assert 4 * (9 + 2 * 16 + 768 + 512) == 5_284
    assert 2 * 4 * (12 + 768 + 512 + 1) + 2 * (768 + 512) == 12_904
    no_interaction = LPIGround(_tiny(), LPIGroundOptions(num_tasks=2, depth=4, layers=4, interact=False))
    assert _trainable(no_interaction) == prompts


def test_vit_b16_counts_are_the_spec_port_numbers():
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone("ViT-B-16", pretrained=None)
    m = LPIGround(backbone, LPIGroundOptions(num_tasks=1))
    assert sum(p.numel() for p in m.prompts[0].parameters()) == 5_284
    assert sum(p.numel() for p in m.interactions[0].parameters()) == 12_904
    assert _trainable(m) == 18_188


def test_only_the_current_tasks_prompts_and_interaction_train():
    m = _method()
    m.begin_task(1)
    assert all(not p.requires_grad for p in m.prompts[0].parameters())
    assert all(not p.requires_grad for p in m.interactions[0].parameters())
    assert all(p.requires_grad for p in m.prompts[1].parameters())
    assert all(p.requires_grad for p in m.interactions[1].parameters())
    assert all(not p.requires_grad for p in m.backbone.parameters())
    assert all(not p.requires_grad for h in m.detector.heads() for p in h.parameters())
    loss = m(_images(), m.tokenize(["a red star", "the blue circle"]), TARGETS)
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith(("prompts.1.", "interactions.1.")) for n in grads)
    assert any(n.startswith("interactions.1.") for n in grads)  # the interaction is on the gradient's path


def test_prompts_enter_inserted_after_the_first_token_then_added():
    m = _method()
    pv, pt = m.task_prompts(0)
    plans = m.task_plans(0)
    assert torch.equal(plans.image.insert, pv[0]) and torch.equal(plans.text.insert, pt[0])
    assert plans.image.start is None and plans.text.start is None  # after CLS / start-of-text
    assert sorted(plans.image.add) == [1, 2, 3] and sorted(plans.text.add) == [1, 2, 3]
    assert torch.equal(plans.image.add[3], pv[3]) and torch.equal(plans.text.add[2], pt[2])
    assert not plans.image.replace and not plans.text.replace
    assert plans.image.insert_before_ln_pre
    replace = grounding_plans(pv, pt, 3, deep="replace")
    assert sorted(replace.image.replace) == [1, 2] and not replace.image.add
    with pytest.raises(ValueError, match="added or replace"):
        grounding_plans(pv, pt, 3, deep="prefix")


def test_interaction_mixes_the_prompt_tokens_of_layers_1_to_depth_minus_1():
    m = _method()
    seen: list[int] = []
    module = m.interactions[0]
    real = module.forward

    def spy(layer, v, t):
        seen.append(layer)
        assert v.shape[1] == t.shape[1] == m.options.n_tokens
        return real(layer, v, t)

    module.forward = spy
    between = m.interaction(0)
    n, b = m.options.n_tokens, m.backbone
    xv, xt = torch.randn(2, 1 + n + 5, b.vision_width), torch.randn(2, 1 + n + 3, b.text_width)
    for layer in range(4):
        v2, t2 = between(layer, xv, xt)
        if layer == 0:
            assert v2 is xv and t2 is xt  # layer 0: prompts were just inserted, no interaction
            continue
        want_v, want_t = real(layer, xv[:, 1 : 1 + n], xt[:, 1 : 1 + n])
        torch.testing.assert_close(v2[:, 1 : 1 + n], want_v)
        torch.testing.assert_close(t2[:, 1 : 1 + n], want_t)
        assert torch.equal(v2[:, 0], xv[:, 0]) and torch.equal(v2[:, 1 + n :], xv[:, 1 + n :])
        assert torch.equal(t2[:, 0], xt[:, 0]) and torch.equal(t2[:, 1 + n :], xt[:, 1 + n :])
    assert seen == [1, 2, 3]
    m.options.depth = 1
    m.depth = 1
    assert m.interaction(0) is None


def test_interaction_couples_image_and_expression():
    """With interaction the expression's embedding depends on the image it is paired with."""
    m = _method()
    tokens = m.tokenize(["a red star", "a red star"])
    same = _images(1).expand(2, -1, -1, -1)
    with torch.no_grad():
        out_same = m.ground(same, tokens)
        out_diff = m.ground(_images(2), tokens)
        m_plain = _method(interact=False)
        plain = m_plain.ground(_images(2), tokens)
    torch.testing.assert_close(out_same.queries[0], out_same.queries[1])
    assert (out_diff.queries[0] - out_diff.queries[1]).abs().max() > 1e-4
    torch.testing.assert_close(plain.queries[0], plain.queries[1])


def test_loss_is_rec_plus_weighted_align_and_task_terms():
    m = _method(num_tasks=3)
    images, tokens = _images(), m.tokenize(["a red star", "the blue circle"])
    m.begin_task(0)
    with torch.no_grad():
        loss0 = m(images, tokens, TARGETS)
        out = m.ground(images, tokens)
        rec, _, _ = rec_loss(out.logits[..., 0], out.boxes, TARGETS, m.options)
        pv, pt = m.prompts[0]()
        align = layer_alignment_loss(pv, pt, 0.01, normalize=True)
    torch.testing.assert_close(loss0, rec + 0.1 * align)
    assert set(m.loss_terms) == {"class", "l1", "giou", "align"}  # no task term in the first task
    m.begin_task(2)
    relation = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    m.set_task_relation(relation)
    with torch.no_grad():
        loss2 = m(images, tokens, TARGETS)
        out = m.ground(images, tokens)
        rec, _, _ = rec_loss(out.logits[..., 0], out.boxes, TARGETS, m.options)
        prompts = [m.prompts[t]() for t in range(3)]
        xv = torch.stack([p[0].flatten() for p in prompts])
        xt = torch.stack([p[1].flatten() for p in prompts])
        task = 0.5 * (task_contrast_loss(xv, relation, 0.01) + task_contrast_loss(xt, relation, 0.01))
        align = layer_alignment_loss(*prompts[2], 0.01, normalize=True)
    torch.testing.assert_close(loss2, rec + 0.1 * align + 0.1 * task)
    assert m.loss_terms["task"] == pytest.approx(float(task), rel=1e-5)


def test_evaluation_routes_each_image_to_a_task_and_uses_its_prompts():
    """Routing by the image's frozen features, each task's prompts and interaction, oracle tasks (shared checks)."""
    m = _method()
    assert isinstance(m, TaskGroundingMethod) and not m.uses_text_keys
    assert_routes_by_image(m)
    # before task 1 exists only task 0 can be chosen
    m.begin_task(0)
    images, tokens = _images(4, seed=5), m.tokenize(["a", "b", "c", "d"])
    assert m.predict(images, tokens, torch.tensor([[64, 64]] * 4), k=1).tasks.tolist() == [0, 0, 0, 0]


def test_routing_reads_the_image_only():
    m = _method()
    images = _images(2, seed=6)
    m.fit_keys(0, m.frozen_image_features(images[:1]).repeat(5, 1))
    m.fit_keys(1, m.frozen_image_features(images[1:]).repeat(5, 1))
    m.begin_task(1)
    a = m.predict(images, m.tokenize(["x", "y"]), torch.tensor([[64, 64]] * 2), k=1).tasks
    b = m.predict(images, m.tokenize(["a long different expression", "z"]), torch.tensor([[64, 64]] * 2), k=1).tasks
    assert a.tolist() == b.tolist() == [0, 1]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="depth"):
        LPIGround(_tiny(), LPIGroundOptions(num_tasks=1, depth=9, layers=4))  # deeper than the tiny towers (4)
    with pytest.raises(ValueError, match="layer slices"):
        LPIGround(_tiny(), LPIGroundOptions(num_tasks=1, depth=4, layers=3))
    m = build_method({"name": "lpi_ground", "num_tasks": 2, "depth": 2, "layers": 2}, _tiny())
    assert isinstance(m, LPIGround) and m.num_tasks == 2


def test_normalized_targets_feed_the_loss_in_the_box_heads_format():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    want = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(normalized_targets(boxes, torch.tensor([[40, 80]])), want)
