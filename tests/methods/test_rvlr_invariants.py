"""RVLR invariants that a one-line change would break (issue 14, mutation testing): each loss term's inputs,
constants and weights, written out from the spec (part B8) with explicit loops, and which tensors train."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.config import DataConfig
from vlprompt.data.features import FeatureCache, caption_sample_id, image_sample_id
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import Plans
from vlprompt.methods.rvlr import soft_cross_entropy

DIMS = {"image_teacher_dim": 6, "text_teacher_dim": 5}


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _batch(e: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    u, t = (F.normalize(torch.randn(5, e, generator=g), dim=-1) for _ in range(2))
    return u, t, torch.tensor([0, 1, 1, 2, 3]), torch.randn(5, 6, generator=g), torch.randn(5, 5, generator=g)


def _ce(logits: torch.Tensor, q: torch.Tensor) -> float:
    """``-(1/B) sum_ij Q_ij log softmax_j(Z_i)`` with loops."""
    total = 0.0
    for i in range(len(logits)):
        logz = math.log(sum(math.exp(float(z)) for z in logits[i]))
        total -= sum(float(q[i, j]) * (float(logits[i, j]) - logz) for j in range(logits.shape[1]))
    return total / len(logits)


def _relations(x: torch.Tensor, tau: float) -> list[float]:
    """Off-diagonal entries of ``cos(x_i, x_j) / tau``, row by row."""
    n = F.normalize(x, dim=-1)
    return [float((n[i] * n[j]).sum()) / tau for i in range(len(x)) for j in range(len(x)) if i != j]


def _mae(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def _mse(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("student", ["single_modal", "pair"])
def test_loss_terms_follow_the_spec(tiny, student: str) -> None:
    method = build_method({"name": "rvlr", "student_relation": student, "lam": 0.3, "relation_temperature": 0.5,
                           **DIMS}, tiny)  # fmt: skip
    u, t, ids, a, b = _batch(tiny.embed_dim)
    with torch.no_grad():
        terms = method.loss_terms(u, t, ids, a, b)
        s = float(method.logit_scale)
        q = torch.tensor([[float(ids[i] == ids[j]) for j in range(5)] for i in range(5)])
        q = q / q.sum(1, keepdim=True)  # captions of one image are all positives
        ga, gb = F.normalize(method.rep_image(a), dim=-1), F.normalize(method.rep_text(b), dim=-1)
        assert float(terms["clip"]) == pytest.approx(0.5 * (_ce(s * u @ t.T, q) + _ce(s * t @ u.T, q)), rel=1e-5)
        assert float(terms["rep_image"]) == pytest.approx(_ce(s * u @ ga.T, q), rel=1e-5)
        assert float(terms["rep_text"]) == pytest.approx(_ce(s * t @ gb.T, q), rel=1e-5)
        r_image, r_text = _relations(a, 0.5), _relations(b, 0.5)
        target = [0.3 * rt + 0.7 * ri for ri, rt in zip(r_image, r_text)]  # E = lam R^T + (1 - lam) R^V
        if student == "pair":
            kd = _mae(_relations(u + t, 0.5), target)
        else:
            kd = _mae(_relations(u, 0.5), target) + _mae(_relations(t, 0.5), target)
        assert float(terms["kd"]) == pytest.approx(kd, rel=1e-5)
        assert float(terms["kd_image"]) == pytest.approx(_mae(r_image, target), rel=1e-5)
        assert float(terms["kd_text"]) == pytest.approx(_mae(r_text, target), rel=1e-5)
        # the official weights a..g: clip 1, rep_image 1, rep_text 2, kd 2, each teacher term 1
        weights = {"clip": 1, "rep_image": 1, "rep_text": 2, "kd": 2, "kd_image": 1, "kd_text": 1}
        want = sum(w * float(terms[k]) for k, w in weights.items())
        assert float(method.total(terms)) == pytest.approx(want, rel=1e-5)


def test_options_reach_the_terms(tiny) -> None:
    u, t, ids, a, b = _batch(tiny.embed_dim, seed=1)
    fixed = build_method({"name": "rvlr", "learn_lambda": False, "soft_targets": False, "lam": 0.3, **DIMS}, tiny)
    with torch.no_grad():
        terms = fixed.loss_terms(u, t, ids, a, b)
        s = float(fixed.logit_scale)
        eye = torch.eye(5)  # without soft targets only the diagonal is positive, even for repeated image ids
        assert float(terms["clip"]) == pytest.approx(0.5 * (_ce(s * u @ t.T, eye) + _ce(s * t @ u.T, eye)), rel=1e-5)
        assert set(terms) == {"clip", "rep_image", "rep_text", "kd"}  # teacher terms only with a learned lambda
    clamped = build_method({"name": "rvlr", "clamp_lambda": True, "lam": 1.0, **DIMS}, tiny)
    with torch.no_grad():
        clamped.lam.fill_(1.7)
        assert float(clamped.lambda_value()) == 1.0
        clamped.lam.fill_(-0.5)
        assert float(clamped.lambda_value()) == 0.0
        free = build_method({"name": "rvlr", **DIMS}, tiny)
        free.lam.fill_(1.7)
        assert float(free.lambda_value()) == pytest.approx(1.7)  # the reference leaves lambda free
        free.tau2.fill_(1e-6)  # tau2 is clamped at 1e-3 so a learned temperature cannot blow the relations up
        kd = free.loss_terms(u, t, ids, a, b)["kd"]
        free.tau2.fill_(1e-3)
        assert float(kd) == pytest.approx(float(free.loss_terms(u, t, ids, a, b)["kd"]), rel=1e-6)
    mse = build_method({"name": "rvlr", "distance": "mse", **DIMS}, tiny)
    with torch.no_grad():
        r = [_relations(x, 0.07) for x in (u, t, a, b)]
        target = [0.5 * rt + 0.5 * ri for ri, rt in zip(r[2], r[3])]
        terms = mse.loss_terms(u, t, ids, a, b)
        for key, rows in (("kd", (r[0], r[1])), ("kd_image", (r[2],)), ("kd_text", (r[3],))):
            want = sum(_mse(x, target) for x in rows)  # every relation term uses the configured distance
            assert float(terms[key]) == pytest.approx(want, rel=1e-4), key


def test_what_trains_and_what_exists(tiny) -> None:
    method = build_method({"name": "rvlr", **DIMS}, tiny)
    assert method.lam.requires_grad and not method.tau2.requires_grad  # defaults: learned lambda, fixed tau2
    assert float(method.lam.detach()) == 0.5 and float(method.tau2) == pytest.approx(0.07)
    assert method.rep_image.in_features == 6 and method.rep_text.in_features == 5
    assert method.rep_image.out_features == method.rep_text.out_features == tiny.embed_dim
    learned = build_method({"name": "rvlr", "learn_relation_temperature": True, **DIMS}, tiny)
    assert learned.tau2.requires_grad
    no_kd = build_method({"name": "rvlr", "w_kd": 0, **DIMS}, tiny)
    assert not no_kd.lam.requires_grad  # lambda acts only through the structure terms
    assert no_kd.uses_teachers
    only_text = build_method({"name": "rvlr", "w_rep_image": 0, **DIMS}, tiny)
    assert only_text.rep_image is None and only_text.rep_text is not None
    none = build_method({"name": "rvlr", "w_rep_image": 0, "w_rep_text": 0, "w_kd": 0}, tiny)
    assert not none.uses_teachers and none.rep_text is None
    method.max_words = 9
    assert method.base.max_words == 9 and method.max_words == 9  # the student tokenizes as the wrapper says
    assert torch.equal(method.logit_scale, method.base.logit_scale)


def test_soft_cross_entropy_is_the_row_mean_of_target_weighted_log_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert float(soft_cross_entropy(logits, q)) == pytest.approx(_ce(logits, q), rel=1e-6)


def test_any_teacher_term_builds_its_map_and_errors_name_the_missing_teacher(tiny) -> None:
    only_text = build_method({"name": "rvlr", "w_rep_image": 0, "w_kd": 0, **DIMS}, tiny)
    assert only_text.uses_teachers and only_text.rep_image is None and only_text.rep_text.in_features == 5
    only_kd = build_method({"name": "rvlr", "w_rep_image": 0, "w_rep_text": 0, **DIMS}, tiny)
    assert only_kd.uses_teachers and only_kd.lam.requires_grad
    assert build_method({"name": "rvlr", **DIMS}, tiny).last_terms == {}
    for what, given in (("image", {"text_teacher_dim": 5}), ("text", {"image_teacher_dim": 6})):
        with pytest.raises(ConfigError) as error:
            build_method({"name": "rvlr", **given}, tiny)
        assert f"--modality {what} --out DIR` and set method.{what}_teacher=DIR" in str(error.value)
        assert str(error.value).startswith(f"rvlr.{what}_teacher ")
    with pytest.raises(ConfigError) as error:
        build_method({"name": "rvlr", "distance": "kl", **DIMS}, tiny)
    assert str(error.value).endswith("got 'kl' (the reference's 'kl' is 'cumsum_mae')")
    with pytest.raises(ConfigError) as error:
        build_method({"name": "rvlr", "distance": "l1", **DIMS}, tiny)
    assert str(error.value).endswith("got 'l1'")


def test_the_wrapper_encodes_exactly_as_its_base_with_the_given_plans(tiny) -> None:
    method = build_method({"name": "rvlr", "base": {"name": "maple", "n_ctx": 2, "depth": 2}, **DIMS}, tiny)
    base, empty = method.base, Plans()  # no prompts: differs from MaPLe's own image and text prompts
    torch.manual_seed(3)
    video = torch.randn(2, 3, 3, tiny.image_size, tiny.image_size)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tokens = method.tokenize(["a red square", "a blue circle"])
    with torch.no_grad():
        torch.testing.assert_close(method.encode_text(tokens, empty), base.encode_text(tokens, empty))
        assert not torch.allclose(method.encode_text(tokens, empty), base.encode_text(tokens), atol=1e-4)
        torch.testing.assert_close(method.encode_image(video[:, 0], empty), base.encode_image(video[:, 0], empty))
        torch.testing.assert_close(method.encode_video(video, mask, empty), base.encode_video(video, mask, empty))
        torch.testing.assert_close(method.encode_visual(video, mask, empty), base.encode_video(video, mask, empty))
        assert not torch.allclose(method.encode_video(video, mask), method.encode_video(video), atol=1e-4)
        assert not torch.allclose(method.encode_video(video, mask, empty), method.encode_video(video, mask), atol=1e-4)


def test_video_loss_reads_the_frame_mask(tiny) -> None:
    method = build_method({"name": "rvlr", "w_rep_image": 0, "w_rep_text": 0, "w_kd": 0}, tiny)
    torch.manual_seed(4)
    video = torch.randn(2, 3, 3, tiny.image_size, tiny.image_size)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tokens = method.tokenize(["a red square", "a blue circle"])
    with torch.no_grad():
        loss = method(video, tokens, mask)
        u, t = method.encode_video(video, mask), method.encode_text(tokens)
        s = float(method.logit_scale)
        eye = torch.eye(2)
        assert float(loss) == pytest.approx(0.5 * (_ce(s * u @ t.T, eye) + _ce(s * t @ u.T, eye)), rel=1e-5)


def test_teacher_features_are_the_rows_of_the_batchs_images_and_captions(tiny, teachers, image_text_set) -> None:
    image, text = teachers
    method = build_method({"name": "rvlr", "image_teacher": str(image), "text_teacher": str(text)}, tiny)
    with pytest.raises(RuntimeError, match="bind_train_set"):
        method.teacher_features(torch.tensor([0]), torch.tensor([0]))
    pairs = vlprompt.data.ImageTextPairs(image_text_set / "train.json", image_text_set, None)
    method.bind_train_set(pairs, DataConfig(root=str(image_text_set)))
    sample_index = torch.tensor([5, 0, 7])
    visual_index = torch.tensor([pairs.pairs[int(i)][0] for i in sample_index])
    a, b = method.teacher_features(visual_index, sample_index)
    image_ids = [image_sample_id(pairs.image_paths[int(i)], image_text_set) for i in visual_index]
    caption_ids = [caption_sample_id(image_ids[k], pairs.pairs[int(s)][1]) for k, s in enumerate(sample_index)]
    torch.testing.assert_close(a, torch.from_numpy(FeatureCache(image).lookup(image_ids)))
    torch.testing.assert_close(b, torch.from_numpy(FeatureCache(text).lookup(caption_ids)))
    with pytest.raises(RuntimeError, match="sample_index"):
        method(
            torch.zeros(1, 3, tiny.image_size, tiny.image_size), method.tokenize(["x"]), visual_index=visual_index[:1]
        )
    for what, key in (("image", "image_teacher_dim"), ("text", "text_teacher_dim")):
        cache = FeatureCache(image if what == "image" else text)
        wrong = build_method({"name": "rvlr", "image_teacher": str(image), "text_teacher": str(text),
                              key: cache.dim + 1}, tiny)  # fmt: skip
        with pytest.raises(ConfigError, match=f"rvlr: {what} teacher cache has"):
            wrong.bind_train_set(pairs, DataConfig(root=str(image_text_set)))
