"""IT-Prompt (and the HiDe-style base it reuses): the spec's A10 invariants on a tiny random-init CLIP."""

from __future__ import annotations

import math

import pytest
import torch

from vlprompt.methods.cil import mask_logits

from .cil_helpers import backbone_state, tiny_cil


def test_clip_stays_bit_identical_and_earlier_prompts_never_change():
    tiny = tiny_cil("itprompt", momentum=0.5, reg=0.1, key_weight=0.5)
    method, learner = tiny.method, tiny.learner
    clip_before = backbone_state(method)
    after_task: list[torch.Tensor] = []
    for t in range(3):
        info = learner.train_task(t)
        assert info["steps"] > 0 and math.isfinite(info["loss"])
        after_task.append(method.prompts.prompts[t].detach().clone())
        learner.evaluate(t)
    for t in range(3):  # prompt t after its own task (momentum included) == prompt t at the end
        assert torch.equal(method.prompts.prompts[t], after_task[t])
    assert not torch.equal(after_task[1], after_task[2])
    clip_after = backbone_state(method)
    assert clip_before.keys() == clip_after.keys()
    assert all(torch.equal(clip_before[k], clip_after[k]) for k in clip_before)
    assert all(not p.requires_grad for p in method.backbone.parameters())


def test_text_anchors_are_fixed_unit_and_gradient_free():
    tiny = tiny_cil("itprompt")
    method, learner = tiny.method, tiny.learner
    anchors = method.text_anchors.clone()
    assert anchors.shape == (6, method.backbone.embed_dim) and not anchors.requires_grad
    torch.testing.assert_close(anchors.norm(dim=-1), torch.ones(6))
    for t in range(2):
        learner.train_task(t)
        assert torch.equal(method.text_anchors, anchors)


def test_logit_masking_in_training_and_prediction():
    tiny = tiny_cil("itprompt")
    method, learner = tiny.method, tiny.learner
    learner.train_task(0)
    method.begin_task(1)
    method.train()
    images, labels, idx = next(iter(learner._loader(learner.train_set, learner.task_indices(learner.train_set, 1), 4)))
    query = learner.queries(learner.train_set)[idx]
    method.head.weight.grad = None
    loss, terms = method.training_loss(images, labels, query)
    assert math.isfinite(float(loss.detach())) and {"ce", "text", "reg"} <= set(terms)
    loss.backward()
    grad = method.head.weight.grad
    assert float(grad[2:4].abs().sum()) > 0 and float(grad[:2].abs().sum()) == 0 and float(grad[4:].abs().sum()) == 0
    method.eval()
    logits, routed = method.predict(images, query)
    assert logits.shape == (len(labels), 4) and routed is not None and int(routed.max()) <= 1  # seen: tasks 0-1
    masked = mask_logits(torch.zeros(2, 6), slice(2, 4))
    assert torch.isinf(masked[:, :2]).all() and torch.isinf(masked[:, 4:]).all() and (masked[:, 2:4] == 0).all()


@pytest.mark.parametrize("within", [True, False])
def test_oracle_routing_is_never_worse_than_predicted_routing(within: bool):
    tiny = tiny_cil("itprompt", predict_within_task=within)
    method, learner = tiny.method, tiny.learner
    for t in range(3):
        learner.train_task(t)
    result = learner.evaluate(2)
    for row in result.per_task:
        assert {"acc", "task_acc", "acc_oracle"} <= set(row)
        if within:  # a wrong route can never give the right class
            assert row["acc_oracle"] >= row["acc"]
    # per sample: where the route is right, the prediction is exactly the oracle's
    images, labels, idx = next(iter(learner._loader(learner.eval_set, list(range(len(learner.eval_set))), 12)))
    query = learner.queries(learner.eval_set)[idx]
    logits, routed = method.predict(images, query)
    oracle, used = method.predict(images, query, method.class_task[labels])
    right = routed == method.class_task[labels]
    assert torch.equal(used, method.class_task[labels])
    assert torch.equal(logits[right].argmax(-1), oracle[right].argmax(-1))
    assert (method.class_task[: method.seen_classes(2)].unique() == torch.arange(3)).all()  # class -> task bijection


def test_text_guidance_pulls_towards_the_own_anchor():
    tiny = tiny_cil("itprompt")
    method = tiny.method
    method.set_current_task(1)
    labels = torch.tensor([2, 3])
    at_anchor = method.text_guidance(method.text_anchors[labels], labels)
    swapped = method.text_guidance(method.text_anchors[labels.flip(0)], labels)
    assert float(at_anchor) < float(swapped)
    cosine = tiny_cil("itprompt", text_loss="cosine").method
    cosine.set_current_task(1)
    assert float(cosine.text_guidance(cosine.text_anchors[labels], labels)) == pytest.approx(0.0, abs=1e-6)


def test_cncm_variant_and_parameter_counts():
    tiny = tiny_cil("itprompt", classifier="ncm")
    method, learner = tiny.method, tiny.learner
    assert method.head is None and method.options.tap is False
    for t in range(2):
        learner.train_task(t)
    result = learner.evaluate(1)
    assert all(0.0 <= row["acc"] <= 100.0 for row in result.per_task)
    full = tiny_cil("itprompt").method
    counts = full.parameter_counts()
    per_task = (
        full.prompts.prompts[0].numel() + full.head.weight.numel() + sum(p.numel() for p in full.tii.parameters())
    )
    assert counts["trainable"] == per_task and counts["total"] > per_task
    with pytest.raises(ValueError, match="text_loss"):
        tiny_cil("itprompt", text_loss="mse")
