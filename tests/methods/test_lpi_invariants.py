"""LPI invariants that a one-line change would break (issue 14, mutation testing): the loss terms' formulas and
constants, which options reach them, the depth bounds, and that the interaction leaves slice 0 alone."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.methods import build_method
from vlprompt.methods.lpi import layer_alignment_loss, task_contrast_loss

from .test_lpi import _manual_task_loss

CAPTIONS = ["a red square", "a picture of a blue circle"]


def _tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _images(bb: vlprompt.Backbone, n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, bb.image_size, bb.image_size)


def _alignment(pv: torch.Tensor, pt: torch.Tensor, tau: float, normalize: bool) -> float:
    """Spec section 3 with explicit loops: u, w = token-wise channel means; symmetric CE against the identity."""
    u, w = pv.mean(-1), pt.mean(-1)
    if normalize:
        u, w = u / u.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True)
    scale = tau if normalize else tau * tau  # normalised: u.w / tau; raw: (u / tau).(w / tau)
    logits = torch.stack([torch.stack([(u[i] * w[j]).sum() / scale for j in range(len(w))]) for i in range(len(u))])
    rows = -torch.stack([logits[i].log_softmax(0)[i] for i in range(len(u))]).mean()
    cols = -torch.stack([logits[:, i].log_softmax(0)[i] for i in range(len(u))]).mean()
    return float(0.5 * (rows + cols))


@pytest.mark.parametrize("normalize", [False, True])
def test_layer_alignment_loss_is_the_symmetric_ce_of_the_channel_means(normalize: bool):
    torch.manual_seed(0)
    pv, pt = torch.randn(5, 6, 8), torch.randn(5, 6, 4)  # L=5 layers, N=6 tokens: rows and columns differ
    tau = 0.5 if normalize else 2.0
    got = float(layer_alignment_loss(pv, pt, temperature=tau, normalize=normalize))
    assert got == pytest.approx(_alignment(pv, pt, tau, normalize), rel=1e-5)
    assert float(layer_alignment_loss(pv, pt)) == pytest.approx(_alignment(pv, pt, 0.01, False), rel=1e-5)


def test_task_contrast_loss_divides_by_its_temperature_and_defaults_to_0_001():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    rel = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    for double in (False, True):
        got = float(task_contrast_loss(x, rel, temperature=0.5, double_sigmoid=double))
        assert got == pytest.approx(_manual_task_loss(x, rel, 0.5, double), rel=1e-5)
    assert float(task_contrast_loss(x, rel)) == pytest.approx(float(task_contrast_loss(x, rel, 0.001)), rel=1e-6)
    assert float(task_contrast_loss(x, rel)) != pytest.approx(float(task_contrast_loss(x, rel, 1.0)), rel=1e-3)
    # a 0/1 relation of any dtype (bool, integer) is the same relation
    assert float(task_contrast_loss(x, rel.long(), 0.5)) == pytest.approx(float(task_contrast_loss(x, rel, 0.5)))


def test_depth_may_reach_the_towers_depth_and_interaction_needs_only_two_slices():
    bb = _tiny()  # 4 blocks per tower
    full = build_method({"name": "lpi", "n_tokens": 2, "layers": 4, "depth": 4}, bb)
    assert set(full.plans().image.add) == {1, 2, 3}
    assert full.loss_terms == {}  # nothing logged before the first step
    two = build_method({"name": "lpi", "n_tokens": 2, "layers": 4, "depth": 2, "interact": True}, bb)
    assert len(two.interactions) == 1
    small = build_method({"name": "lpi", "n_tokens": 2, "layers": 4, "init_std": 0.05}, bb)
    big = build_method({"name": "lpi", "n_tokens": 2, "layers": 4}, bb)  # LPI's 0.5
    assert float(small.prompts[0].channel_v.detach().std()) < 0.1 < float(big.prompts[0].channel_v.detach().std())


def test_interaction_mixes_slices_1_to_depth_minus_1_with_the_tasks_own_module():
    bb = _tiny()
    method = build_method(
        {"name": "lpi", "num_tasks": 2, "n_tokens": 2, "layers": 4, "depth": 3, "interact": True}, bb
    )
    with torch.no_grad():
        for task in (0, 1):
            pv, pt = method.prompts[task]()
            v, t = method.task_prompts(task)
            assert v.shape[0] == t.shape[0] == 3  # depth slices
            assert torch.equal(v[0], pv[0]) and torch.equal(t[0], pt[0])  # slice 0 enters as it is
            for layer in (1, 2):
                want_v, want_t = method.interactions[task](layer, pv[layer], pt[layer])
                torch.testing.assert_close(v[layer], want_v)
                torch.testing.assert_close(t[layer], want_t)
        other_v, _ = method.interactions[0](1, *[p[1] for p in method.prompts[1]()])
        assert not torch.allclose(method.task_prompts(1)[0][1], other_v)  # task 1 uses its own module


def test_training_loss_passes_its_options_to_each_term():
    """``loss = clip + w_a align(P_v, P_t; tau_a, normalize) + w_t 0.5 (tc(X_v) + tc(X_t))`` (task >= 1)."""
    bb = _tiny()
    options = {"name": "lpi", "num_tasks": 2, "n_tokens": 2, "layers": 4, "align_normalize": True,
               "align_temperature": 0.2, "align_weight": 0.3, "task_weight": 0.7, "task_temperature": 0.5,
               "double_sigmoid": True}  # fmt: skip
    method = build_method(options, bb)
    method.set_task_relation(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    method.begin_task(1)
    images, tokens = _images(bb), method.tokenize(CAPTIONS)
    loss = method(images, tokens)
    with torch.no_grad():
        pv, pt = method.prompts[1]()
        plans = method.task_plans(1)
        clip = method.loss_fn(method.encode_image(images, plans), method.encode_text(tokens, plans), bb.logit_scale)
        align = layer_alignment_loss(pv, pt, 0.2, normalize=True)
        earlier = method.prompts[0]()
        rel = torch.ones(2, 2)
        xv, xt = (torch.stack([earlier[i].flatten(), p.flatten()]) for i, p in enumerate((pv, pt)))
        task = 0.5 * (task_contrast_loss(xv, rel, 0.5, True) + task_contrast_loss(xt, rel, 0.5, True))
    terms = method.loss_terms
    assert terms["clip"] == pytest.approx(float(clip), rel=1e-5)
    assert terms["align"] == pytest.approx(float(align), rel=1e-5)
    assert terms["task"] == pytest.approx(float(task), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(clip + 0.3 * align + 0.7 * task), rel=1e-5)
    # the relation set by the runner is used (all related here), not the identity fallback
    eye_task = 0.5 * (
        task_contrast_loss(xv, torch.eye(2), 0.5, True) + task_contrast_loss(xt, torch.eye(2), 0.5, True)
    )
    assert float(task) != pytest.approx(float(eye_task), rel=1e-3)


def test_video_training_pools_only_the_valid_frames():
    """Videos: the CLIP term reads the frame mask (meanP over valid frames) under the current task's prompts."""
    bb = _tiny()
    method = build_method({"name": "lpi", "n_tokens": 2, "layers": 4}, bb)
    torch.manual_seed(4)
    video = torch.randn(2, 3, 3, bb.image_size, bb.image_size)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tokens = method.tokenize(CAPTIONS)
    method(video, tokens, mask)
    with torch.no_grad():
        plans = method.task_plans(0)
        vis, txt = method.encode_video(video, mask, plans), method.encode_text(tokens, plans)
        clip = method.loss_fn(vis, txt, bb.logit_scale)
        unmasked = method.loss_fn(method.encode_video(video, None, plans), txt, bb.logit_scale)
    assert method.loss_terms["clip"] == pytest.approx(float(clip), rel=1e-5)
    assert float(clip) != pytest.approx(float(unmasked), rel=1e-4)
