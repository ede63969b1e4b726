"""The L2P family on the class-incremental protocol: zero-shot, L2P, DualPrompt, CODA-Prompt, HiDe-style."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from .cil_helpers import backbone_state, tiny_cil


@pytest.mark.parametrize("name", ["l2p_cil", "dualprompt", "coda_prompt", "hide_prompt"])
def test_training_moves_only_the_method_and_predicts_over_seen_classes(name: str):
    tiny = tiny_cil(name)
    method, learner = tiny.method, tiny.learner
    clip = backbone_state(method)
    head = method.head.weight.detach().clone()
    for t in range(2):
        info = learner.train_task(t)
        assert info["steps"] > 0 and math.isfinite(info["loss"])
        result = learner.evaluate(t)
        assert len(result.per_task) == t + 1 and result.info["seen_classes"] == 2 * (t + 1)
    assert not torch.equal(method.head.weight, head)
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in clip.items())
    images, labels, idx = next(iter(learner._loader(learner.eval_set, list(range(len(learner.eval_set))), 12)))
    logits, routed = method.predict(images, learner.queries(learner.eval_set)[idx])
    assert logits.shape == (12, 4) and torch.isfinite(logits).all()
    assert (routed is not None) == method.routes_tasks
    if routed is not None:
        assert int(routed.min()) >= 0 and int(routed.max()) <= 1


def test_dualprompt_keeps_earlier_e_prompts_and_trains_the_shared_g_prompt():
    tiny = tiny_cil("dualprompt")
    method, learner = tiny.method, tiny.learner
    learner.train_task(0)
    e0, k0, g = (method.prompts.e.prompts[0].detach().clone(), method.prompts.e.keys[0].detach().clone(),
                 method.prompts.g.detach().clone())  # fmt: skip
    learner.train_task(1)
    assert torch.equal(method.prompts.e.prompts[0], e0) and torch.equal(method.prompts.e.keys[0], k0)
    assert not torch.equal(method.prompts.g, g)  # the G-prompt is shared by every task
    assert method.parameter_counts()["trainable"] == sum(p.numel() for p in method.trainable_parameters())


def test_coda_freezes_earlier_components_and_l2p_trains_its_shared_pool():
    coda = tiny_cil("coda_prompt")
    coda.learner.train_task(0)
    chunk0 = [t[0].detach().clone() for t in (coda.method.pool.p, coda.method.pool.k, coda.method.pool.a)]
    coda.learner.train_task(1)
    assert all(
        torch.equal(a, b[0]) for a, b in zip(chunk0, (coda.method.pool.p, coda.method.pool.k, coda.method.pool.a))
    )
    assert not torch.equal(coda.method.pool.p[1], torch.zeros_like(coda.method.pool.p[1]))
    l2p = tiny_cil("l2p_cil")
    keys = l2p.method.pool.keys.detach().clone()
    l2p.learner.train_task(0)
    l2p.learner.train_task(1)
    assert not torch.equal(l2p.method.pool.keys, keys)  # the pull term trains the shared keys on every task


def test_zeroshot_is_clip_with_the_text_anchors():
    tiny = tiny_cil("zeroshot_cil")
    method, learner = tiny.method, tiny.learner
    assert method.head is None and method.parameter_counts()["trainable"] == 0
    info = learner.train_task(0)
    assert info["steps"] == 0
    images, labels, idx = next(iter(learner._loader(learner.eval_set, list(range(len(learner.eval_set))), 12)))
    method.set_current_task(2)
    logits, routed = method.predict(images, learner.queries(learner.eval_set)[idx])
    with torch.no_grad():
        clip = F.normalize(method.backbone.encode_image(images), dim=-1) @ method.text_anchors.T
    assert routed is None and torch.equal(logits.argmax(-1), clip.argmax(-1))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="head"):
        tiny_cil("l2p_cil", head="mlp")
    with pytest.raises(ValueError, match="prompt layers"):
        tiny_cil("coda_prompt", layers=[0, 9])
