"""Shared fixtures of the grounding-method tests: the tiny backbone, images, targets and parameter counting."""

from __future__ import annotations

import torch

import vlprompt
from vlprompt.methods.grounding import GroundingMethod, rec_loss

#: Normalised ``cxcywh`` targets of two expressions.
TARGETS = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.3, 0.4]])
EXPRESSIONS = ["a red star", "the blue circle"]


def tiny() -> vlprompt.Backbone:
    """The tiny random backbone: vision 192 wide, text 128, joint 128, 4 layers each, 64x64 input."""
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def vit_b16() -> vlprompt.Backbone:
    """A randomly initialised ViT-B/16 (vision 768, text 512, joint 512, 12 layers): the spec's shapes."""
    torch.manual_seed(0)
    return vlprompt.load_backbone("ViT-B-16", pretrained=None)


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 64, 64)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def grads(module: torch.nn.Module) -> set[str]:
    """Names of the parameters with a non-zero gradient."""
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def rec_only(method: GroundingMethod, imgs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The detector's REC loss under the method's current plans (and interaction), recomputed from outside."""
    with torch.no_grad():
        out = method.ground(imgs, tokens)
        loss, _, _ = rec_loss(out.logits[..., 0], out.boxes, TARGETS, method.options)
    return loss


def assert_routes_by_image(method) -> None:
    """Evaluation picks each image's task by its frozen features (keys fitted on constructed features) and answers
    with that task's prompts and interaction; the expression does not vote; oracle tasks override routing."""
    imgs, tokens = images(4, seed=5), method.tokenize(["a", "b", "c", "d"])
    feats = method.frozen_image_features(imgs)
    method.begin_task(1)
    method.fit_keys(0, feats[:2].repeat(3, 1))
    method.fit_keys(1, feats[2:].repeat(3, 1))
    sizes = torch.tensor([[64, 64]] * 4)
    pred = method.predict(imgs, tokens, sizes, k=3)
    assert pred.tasks.tolist() == [0, 0, 1, 1]
    other = method.predict(imgs, method.tokenize(["a much longer expression", "z", "y", "x"]), sizes, k=1)
    assert other.tasks.tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        alone = method.ground(imgs[2:], tokens[2:], method.task_plans(1), method.interaction(1))
        wrong = method.ground(imgs[2:], tokens[2:], method.task_plans(0), method.interaction(0))
    top = alone.logits[..., 0].sort(dim=-1, descending=True, stable=True).values[:, :3]
    torch.testing.assert_close(pred.scores[2:], top)
    assert (wrong.logits - alone.logits).abs().max() > 1e-4
    oracle = method.predict(imgs, tokens, sizes, k=3, tasks=torch.tensor([1, 1, 1, 1]))
    assert oracle.tasks.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(oracle.scores[2:], pred.scores[2:])
