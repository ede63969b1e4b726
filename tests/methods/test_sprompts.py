"""S-Prompts (a prompt pair per task, routed at test time) and sequential fine-tuning of one shared pair."""

from __future__ import annotations

import torch

import vlprompt
from vlprompt.methods import build_method

CAPTIONS = ["a red square", "a blue circle", "a green star"]


def _tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def test_counts_and_current_task_only():
    bb = _tiny()
    method = build_method({"name": "sprompts", "num_tasks": 3, "n_tokens": 4}, bb)
    per_task = 4 * (bb.vision_width + bb.text_width)
    assert method.parameter_counts()["trainable"] == per_task
    method.begin_task(2)
    assert {n.split(".")[1] for n, p in method.named_parameters() if p.requires_grad} == {"2"}
    seq = build_method({"name": "seqft", "num_tasks": 3, "n_tokens": 4}, bb)
    seq.begin_task(2)
    assert seq.parameter_counts()["trainable"] == per_task  # one shared pair, trained on every task


def test_routed_evaluation_uses_each_samples_task_prompts():
    bb = _tiny()
    method = build_method({"name": "sprompts", "num_tasks": 2, "n_tokens": 4, "n_keys": 1}, bb)
    torch.manual_seed(2)
    images = torch.randn(3, 3, bb.image_size, bb.image_size)
    image_keys = method.frozen_image_features(images)
    text_keys = method.frozen_text_features(CAPTIONS)
    method.fit_keys(0, image_keys[:1], text_keys[:1])
    method.fit_keys(1, image_keys[1:2], text_keys[1:2])
    method.begin_task(1)
    feats, routed = method.encode_images_eval(images[:2])
    assert routed.tolist() == [0, 1]  # each image's own features are its task's key
    torch.testing.assert_close(feats[1:], method.encode_image(images[1:2], method.task_plans(1)))
    torch.testing.assert_close(feats[:1], method.encode_image(images[:1], method.task_plans(0)))
    oracle_feats, used = method.encode_images_eval(images[:2], torch.tensor([1, 1]))
    assert used.tolist() == [1, 1]
    torch.testing.assert_close(oracle_feats[:1], method.encode_image(images[:1], method.task_plans(1)))
    text_feats, text_routed = method.encode_texts_eval(CAPTIONS[:2])
    assert text_routed.tolist() == [0, 1] and text_feats.shape == (2, bb.embed_dim)


def test_sprompts_and_seqft_encode_lpis_string_with_the_trailing_period():
    """Both baselines live in LPI's code base and share its prompt learner: ``"X" * N + " " + caption + "."``."""
    bb = _tiny()
    for name in ("sprompts", "seqft"):
        method = build_method({"name": name, "num_tasks": 2, "n_tokens": 4}, bb)
        assert torch.equal(method.tokenize(["a red square"]), bb.tokenize(["X X X X a red square."]))
        plain = build_method({"name": name, "num_tasks": 2, "n_tokens": 4, "caption_suffix": ""}, bb)
        assert torch.equal(plain.tokenize(["a red square"]), bb.tokenize(["X X X X a red square"]))
