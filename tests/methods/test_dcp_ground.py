"""DCP for grounding: S-Prompts' depth-1 prompts + LPI's per-task interaction through the ONE shared coupling
(layers 1..interact_depth-1, the N prompt tokens of both towers), parameters from the shapes, what trains, REC
loss only, image routing."""

from __future__ import annotations

import pytest
import torch

from vlprompt.errors import ConfigError
from vlprompt.methods import build_method, list_methods
from vlprompt.methods.continual_grounding import prompt_interaction
from vlprompt.methods.dcp_ground import DCPGround, DCPGroundOptions
from vlprompt.methods.lpi_ground import LPIGround, LPIGroundOptions
from vlprompt.methods.sprompts_ground import SPromptsGroundOptions
from vlprompt.prompts.lpi import FullRankPrompt, LowRankInteraction

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


def _method(num_tasks: int = 2, **kw) -> DCPGround:
    torch.manual_seed(3)
    kw.setdefault("interact_depth", 3)  # the tiny towers have 4 layers
    return DCPGround(tiny(), DCPGroundOptions(num_tasks=num_tasks, **kw))


def test_defaults_are_the_reference_baseline():
    o = DCPGroundOptions()
    assert isinstance(o, SPromptsGroundOptions)
    assert (o.n_tokens, o.depth, o.init_std) == (16, 1, 0.02)  # full-rank depth-1 prompts
    assert (o.interact_depth, o.interact_rank, o.interact_mix) == (9, 4, 0.1)  # INTERACT_DEPTH, INTERACT_LORA_D
    assert "dcp_ground" in list_methods()
    m = build_method({"name": "dcp_ground", "num_tasks": 2, "interact_depth": 2}, tiny())
    assert isinstance(m, DCPGround) and m.interact_depth == 2 and m.depth == 1


def test_trainable_per_task_is_full_rank_prompts_plus_the_interaction():
    m = _method(num_tasks=3)
    b = m.backbone
    dv, dt, towers, r = b.vision_width, b.text_width, 4, 4
    prompts = 16 * (dv + dt)
    interaction = 2 * r * (towers + dv + dt + 1) + 2 * (dv + dt)
    assert trainable(m) == prompts + interaction
    assert isinstance(m.prompts[0], FullRankPrompt) and isinstance(m.interactions[0], LowRankInteraction)
    assert len(m.prompts) == len(m.interactions) == 3


def test_vit_b16_counts():
    m = DCPGround(vit_b16(), DCPGroundOptions(num_tasks=1))
    assert sum(p.numel() for p in m.prompts[0].parameters()) == 20_480
    assert sum(p.numel() for p in m.interactions[0].parameters()) == 12_904  # spec 2.4's port, L = 12
    assert trainable(m) == 33_384


def test_interaction_mixes_the_prompt_tokens_before_blocks_1_to_interact_depth_minus_1():
    m = _method()
    assert m.depth == 1  # the prompts are depth 1, the interaction goes deeper
    module, n, b = m.interactions[0], m.options.n_tokens, m.backbone
    seen: list[int] = []
    real = module.forward

    def spy(layer, v, t):
        seen.append(layer)
        assert v.shape[1] == t.shape[1] == n
        return real(layer, v, t)

    module.forward = spy
    between = m.interaction(0)
    xv, xt = torch.randn(2, 1 + n + 5, b.vision_width), torch.randn(2, 1 + n + 3, b.text_width)
    for layer in range(4):
        v2, t2 = between(layer, xv, xt)
        if layer in (0, 3):  # block 0: prompts just inserted; block 3: at or past interact_depth
            assert v2 is xv and t2 is xt
            continue
        want_v, want_t = real(layer, xv[:, 1 : 1 + n], xt[:, 1 : 1 + n])
        torch.testing.assert_close(v2[:, 1 : 1 + n], want_v)
        torch.testing.assert_close(t2[:, 1 : 1 + n], want_t)
        assert torch.equal(v2[:, 0], xv[:, 0]) and torch.equal(v2[:, 1 + n :], xv[:, 1 + n :])
        assert torch.equal(t2[:, 0], xt[:, 0]) and torch.equal(t2[:, 1 + n :], xt[:, 1 + n :])
    assert seen == [1, 2]
    assert _method(interact_depth=1).interaction(0) is None  # nothing to couple


def test_lpi_and_dcp_share_one_coupling():
    """The same interaction weights couple the towers identically in LPI and DCP (one helper)."""
    dcp = _method(interact_depth=4)
    torch.manual_seed(4)
    lpi = LPIGround(tiny(), LPIGroundOptions(num_tasks=2, depth=4, layers=4))
    dcp.interactions[1].load_state_dict(lpi.interactions[1].state_dict())
    n, b = 16, dcp.backbone
    xv, xt = torch.randn(2, 1 + n + 4, b.vision_width), torch.randn(2, 1 + n + 2, b.text_width)
    for layer in (1, 3):
        for got, want in zip(dcp.interaction(1)(layer, xv, xt), lpi.interaction(1)(layer, xv, xt)):
            torch.testing.assert_close(got, want)
    assert prompt_interaction(dcp.interactions[1], n, 1) is None


def test_interaction_couples_image_and_expression():
    """Through ground(): the expression's embedding depends on the image it is paired with."""
    m = _method()
    tokens = m.tokenize(["a red star", "a red star"])
    with torch.no_grad():
        same = m.ground(images(1).expand(2, -1, -1, -1), tokens)
        diff = m.ground(images(2), tokens)
    torch.testing.assert_close(same.queries[0], same.queries[1])
    assert (diff.queries[0] - diff.queries[1]).abs().max() > 1e-4


def test_only_the_current_tasks_prompts_and_interaction_train_with_the_rec_loss_alone():
    m = _method()
    m.begin_task(1)
    assert all(not p.requires_grad for p in [*m.prompts[0].parameters(), *m.interactions[0].parameters()])
    assert all(p.requires_grad for p in [*m.prompts[1].parameters(), *m.interactions[1].parameters()])
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)
    loss = m(imgs, tokens, TARGETS)
    torch.testing.assert_close(loss.detach(), rec_only(m, imgs, tokens))
    assert set(m.loss_terms) == {"class", "l1", "giou"}  # no alignment or task terms
    loss.backward()
    names = grads(m)
    assert names and all(n.startswith(("prompts.1.", "interactions.1.")) for n in names)
    assert any(n.startswith("interactions.1.") for n in names)


def test_evaluation_routes_each_image_to_its_tasks_prompts_and_interaction():
    assert_routes_by_image(_method())


def test_interaction_deeper_than_the_towers_is_refused():
    with pytest.raises(ConfigError, match="interact_depth"):
        _method(interact_depth=5)
