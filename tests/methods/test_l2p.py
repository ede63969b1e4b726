"""L2P: a shared key-query prompt pool; per-sample selection at evaluation (independent of the batch)."""

from __future__ import annotations

import torch

import vlprompt
from vlprompt.methods import build_method

CAPTIONS = ["a red square", "a blue circle", "a green star", "a white moon"]


def _tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def test_vit_b16_pool_size():
    bb = vlprompt.load_backbone("ViT-B-16", pretrained=None)
    method = build_method({"name": "l2p", "pool_size": 12, "length": 4, "top_k": 4}, bb)
    assert method.parameter_counts()["trainable"] == 12 * 4 * 768 + 12 * 512  # prompts + keys (joint space)


def test_features_do_not_depend_on_the_batch_and_training_moves_keys():
    bb = _tiny()
    method = build_method({"name": "l2p", "pool_size": 6, "length": 2, "top_k": 2, "text_pool": True}, bb).eval()
    torch.manual_seed(3)
    images = torch.randn(4, 3, bb.image_size, bb.image_size)
    together, _ = method.encode_images_eval(images)
    alone = torch.cat([method.encode_images_eval(images[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    texts = method.encode_texts_eval(CAPTIONS)[0]
    torch.testing.assert_close(texts[:1], method.encode_texts_eval(CAPTIONS[:1])[0], atol=1e-5, rtol=1e-5)
    method.train()
    loss = method(images, method.tokenize(CAPTIONS))
    loss.backward()
    assert method.pool.keys.grad.abs().sum() > 0 and method.pool.prompts.grad.abs().sum() > 0
    assert method.text_pool.keys.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.backbone.parameters())
