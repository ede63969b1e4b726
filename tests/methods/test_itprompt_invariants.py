"""IT-Prompt and HiDe invariants that a one-line change would break (issue 14, mutation testing): the text-guide
term's classes, scale and targets, the optional key pull, the test-time logits (head + text, or C-NCM), and the
decorated routing and prediction code (``route``, ``predict``) that mutmut does not mutate by itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.prompts.dualprompt import prefix_plan

from .cil_helpers import FixedLogits, tiny_cil


def _z(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_text_guide_is_ce_over_the_tasks_anchors_at_clip_scale_or_the_given_one():
    method = tiny_cil("itprompt").method
    method.set_current_task(1)  # classes 2, 3
    z, labels = _z(4, method.backbone.embed_dim), torch.tensor([2, 3, 3, 2])
    s = method.backbone.logit_scale
    with torch.no_grad():
        want = F.cross_entropy(s * z @ method.text_anchors[2:4].T, labels - 2)
        torch.testing.assert_close(method.text_guidance(z, labels), want)
        seen = tiny_cil("itprompt", text_classes="seen", text_scale=0.5).method
        seen.set_current_task(1)
        want = F.cross_entropy(0.5 * z @ seen.text_anchors[:4].T, labels)  # every seen class, scale 0.5
        torch.testing.assert_close(seen.text_guidance(z, labels), want)
        cosine = tiny_cil("itprompt", text_loss="cosine").method
        want = (1 - (z * cosine.text_anchors[labels]).sum(-1)).mean()
        torch.testing.assert_close(cosine.text_guidance(z, labels), want)


def test_guidance_weights_the_text_term_and_adds_the_key_pull():
    method = tiny_cil("itprompt", text_weight=0.5, key_weight=0.25).method
    assert method.prompts.keys is not None and method.prompts.keys[0].shape == (method.query_dim,)
    assert tiny_cil("itprompt").method.prompts.keys is None  # no keys without the pull term
    method.set_current_task(1)
    z, labels = _z(3, method.backbone.embed_dim), torch.tensor([2, 3, 2])
    query = torch.randn(3, method.query_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, terms = method.guidance(z, labels, query)
        text = method.text_guidance(z, labels)
        pull = (1 - F.cosine_similarity(query, method.prompts.keys[1][None], dim=-1)).mean()  # task 1's key
    assert terms["text"] == pytest.approx(float(text)) and terms["pull"] == pytest.approx(float(pull), rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * float(text) + 0.25 * float(pull), rel=1e-6)
    none = tiny_cil("itprompt", text_weight=0.0).method
    loss, terms = none.guidance(z, labels, query)
    assert terms == {} and float(loss) == 0.0


def test_test_logits_add_the_weighted_text_similarity_or_use_the_nearest_centroid():
    method = tiny_cil("itprompt", infer_text_weight=0.25).method
    z = _z(3, method.backbone.embed_dim)
    with torch.no_grad():
        want = method.classify(z) + 0.25 * method.backbone.logit_scale * z @ method.text_anchors.T
        torch.testing.assert_close(method.eval_logits(z), want)
        assert tiny_cil("itprompt").method.eval_logits(z).shape == (3, 6)
    ncm = tiny_cil("itprompt", classifier="ncm").method
    assert ncm.options.head == "text" and ncm.head is None
    feats = torch.cat([_z(4, ncm.backbone.embed_dim, seed) for seed in (1, 2)])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ncm.feature_stats.fit(feats, labels)  # classes 2..5 have no centroid: never predicted
    logits = ncm.eval_logits(feats[:2])
    assert torch.isinf(logits[:, 2:]).all() and (logits[:, 2:] < 0).all()
    for row in range(2):
        for c in (0, 1):
            used = ncm.feature_stats.counts[c] > 0
            d = ((feats[row] - ncm.feature_stats.means[c][used]) ** 2).sum(-1).min()
            assert float(logits[row, c]) == pytest.approx(-float(d), rel=1e-5)


def test_routing_takes_the_task_of_the_best_seen_class_and_prediction_masks_unseen_and_other_tasks():
    for name in ("hide_prompt", "itprompt"):
        method = tiny_cil(name).method.eval()
        method.set_current_task(1)  # classes 0..3 seen
        method.tii = FixedLogits([0.0, 1.0, 3.0, 0.5, 9.0, 9.0])  # classes 4, 5 unseen: ignored
        query = torch.zeros(2, method.query_dim)
        assert method.route(query).tolist() == [1, 1]  # class 2 -> task 1
        method.tii = FixedLogits([0.0, 2.0, 1.0, 0.5, 9.0, 9.0])
        assert method.route(query).tolist() == [0, 0]  # class 1 -> task 0
        torch.manual_seed(0)
        images = torch.randn(2, 3, method.backbone.image_size, method.backbone.image_size)
        logits, routed = method.predict(images, query)
        assert routed.tolist() == [0, 0] and logits.shape == (2, 4)
        z = method.encode_prompted(images, prefix_plan(method.options.layers, method.prompts.gather(routed)))
        torch.testing.assert_close(logits, method.eval_logits(z)[:, :4])  # the routed task's prompt
        oracle, used = method.predict(images, query, torch.tensor([1, 1]))
        assert used.tolist() == [1, 1]
        z1 = method.encode_prompted(images, prefix_plan(method.options.layers, method.prompts.gather(used)))
        torch.testing.assert_close(oracle, method.eval_logits(z1)[:, :4])
    within = tiny_cil("hide_prompt", predict_within_task=True).method.eval()
    within.set_current_task(1)
    logits, _ = within.predict(images, query, torch.tensor([1, 0]))
    assert torch.isinf(logits[0, :2]).all() and torch.isfinite(logits[0, 2:]).all()  # task 1: classes 2, 3 only
    assert torch.isfinite(logits[1, :2]).all() and torch.isinf(logits[1, 2:]).all()
