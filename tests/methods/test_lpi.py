"""LPI: parameter count on ViT-B/16, where prompts enter, depth, losses, and that only the current task trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.methods import build_method
from vlprompt.methods.continual import prompt_pair_plans
from vlprompt.methods.lpi import layer_alignment_loss, task_contrast_loss

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red square", "a picture of a blue circle"]


def _tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _images(bb: vlprompt.Backbone, n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, bb.image_size, bb.image_size)


def test_vit_b16_trains_5284_parameters_per_task():
    torch.manual_seed(0)
    bb = vlprompt.load_backbone("ViT-B-16", pretrained=None)
    method = build_method({"name": "lpi", "num_tasks": 12, "n_tokens": 16, "layers": 9, "rank": 4}, bb)
    assert method.parameter_counts()["trainable"] == 5_284
    method.begin_task(7)
    assert method.parameter_counts()["trainable"] == 5_284
    assert [n for n, p in method.named_parameters() if p.requires_grad][0].startswith("prompts.7.")


def test_params_command_prints_5284_for_the_coco_recipe(capsys):
    from vlprompt.cli.main import main

    assert main(["params", str(REPO / "configs" / "lpi_coco_vitb16.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trainable"] == 5_284


def test_vision_sequence_and_text_placeholders():
    bb = _tiny()
    method = build_method({"name": "lpi", "n_tokens": 4, "layers": 4}, bb)
    plans = method.plans()
    tokens = bb.vision(_images(bb), plans.image, return_tokens=True).tokens
    patches = (bb.image_size // bb.vision.visual.patch_size[0]) ** 2
    assert tokens.shape[1] == 1 + 4 + patches
    ids = method.tokenize(CAPTIONS)
    assert (ids[:, 1:5] == bb.tokenize(["x"])[0, 1]).all()  # N placeholder words right after start-of-text
    # with the placeholders' own embeddings as context, the text features equal those of the X-prefixed captions
    x_embedding = bb.text.token_embedding(ids[:1, 1:5])[0].detach()
    pv, _ = method.prompts[0]()
    same = prompt_pair_plans(pv.detach(), x_embedding.expand(4, -1, -1), depth=1)
    torch.testing.assert_close(method.encode_text(ids, same), F.normalize(bb.encode_text(ids), dim=-1))


def test_depth_one_ignores_deeper_slices_and_depth_two_uses_them():
    bb = _tiny()
    shallow = build_method({"name": "lpi", "n_tokens": 4, "layers": 4, "depth": 1, "align_weight": 0.0}, bb)
    shallow(_images(bb), shallow.tokenize(CAPTIONS)).backward()
    prompt = shallow.prompts[0]
    assert prompt.layer.grad[1:].abs().max() == 0 and prompt.layer.grad[0].abs().max() > 0
    deep = build_method({"name": "lpi", "n_tokens": 4, "layers": 4, "depth": 2, "align_weight": 0.0}, bb)
    plans = deep.plans()
    assert set(plans.image.add) == {1} and set(plans.text.add) == {1}
    deep(_images(bb), deep.tokenize(CAPTIONS)).backward()
    assert deep.prompts[0].layer.grad[1].abs().max() > 0 and deep.prompts[0].layer.grad[2:].abs().max() == 0
    with pytest.raises(ValueError, match="depth"):
        build_method({"name": "lpi", "layers": 9, "depth": 5}, bb)  # the tiny towers have 4 blocks


def test_layer_alignment_loss():
    torch.manual_seed(0)
    pv, pt = torch.randn(9, 16, 768) * 0.06, torch.randn(9, 16, 512) * 0.06
    assert layer_alignment_loss(pv, pt) == pytest.approx(math.log(9), abs=0.3)
    aligned = torch.eye(9).unsqueeze(-1).expand(9, 9, 8) * 0.05  # layer l's mean profile is one-hot at token l
    assert float(layer_alignment_loss(aligned, aligned)) < 0.01
    assert float(layer_alignment_loss(aligned, aligned, normalize=True)) < 0.01


def _bce(q: float, target: float) -> float:
    return -(math.log(q) if target else math.log(1 - q))


def _manual_task_loss(x: torch.Tensor, rel: torch.Tensor, tau: float, double: bool) -> float:
    """Spec section 3 with loops: p = sigmoid(C / tau), diagonal 1; per row, mean over related + over unrelated."""
    c = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
    total = 0.0
    for i in range(len(x)):
        pos, neg = [], []
        for j in range(len(x)):
            p = 1.0 if i == j else float(torch.sigmoid(c[i, j] / tau))
            target = 1.0 if i == j else float(rel[i, j])
            if double:  # BCE-with-logits on p: the sigmoid applied a second time
                p = float(torch.sigmoid(torch.tensor(p)))
            (pos if target else neg).append(_bce(p, target) if p < 1.0 else 0.0)
        total += sum(pos) / len(pos) + sum(neg) / len(neg)
    return total / len(x)


def test_task_contrast_loss_single_and_double_sigmoid():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    rel = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for double in (False, True):
        got = float(task_contrast_loss(x, rel, temperature=1.0, double_sigmoid=double))
        assert got == pytest.approx(_manual_task_loss(x, rel, 1.0, double), rel=1e-5)
    single = float(task_contrast_loss(x, rel, 1.0))
    assert single != pytest.approx(float(task_contrast_loss(x, rel, 1.0, double_sigmoid=True)))
    all_related = torch.ones(2, 2)  # no unrelated task: NaN in the reference, finite here
    assert math.isfinite(float(task_contrast_loss(torch.randn(2, 4), all_related)))


def test_task_loss_only_from_the_second_task_and_only_current_prompts_train():
    bb = _tiny()
    method = build_method({"name": "lpi", "num_tasks": 3, "n_tokens": 4, "layers": 4}, bb)
    method(_images(bb), method.tokenize(CAPTIONS))
    assert set(method.loss_terms) == {"clip", "align"}
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.begin_task(1)
    method(_images(bb), method.tokenize(CAPTIONS)).backward()
    assert set(method.loss_terms) == {"clip", "align", "task"}
    with_grad = {n for n, p in method.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("prompts.1.") for n in with_grad)
    torch.optim.SGD(method.trainable_parameters(), lr=0.1).step()
    after = method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("prompts.1.") for k in changed)  # CLIP and task 0 bit-identical


def test_paper_mode_interaction():
    bb = _tiny()
    with pytest.raises(ValueError, match="depth >= 2"):
        build_method({"name": "lpi", "layers": 4, "interact": True}, bb)
    method = build_method({"name": "lpi", "n_tokens": 4, "layers": 4, "depth": 3, "interact": True}, bb)
    loss = method(_images(bb), method.tokenize(CAPTIONS))
    loss.backward()
    assert method.interactions[0].v2t.a.grad is not None
    prompts = sum(p.numel() for p in method.prompts[0].parameters())
    assert method.parameter_counts()["trainable"] == prompts + sum(
        p.numel() for p in method.interactions[0].parameters()
    )


def test_text_is_lpis_string_with_the_trailing_period():
    """LPI's prompt learner encodes ``"X" * N + " " + caption + "."``, for training, evaluation and text keys."""
    bb = _tiny()
    method = build_method({"name": "lpi", "n_tokens": 4, "layers": 4, "text_keys_with_placeholders": True}, bb)
    ids = method.tokenize(["a red square"])
    sot, x, period, eot = 49406, 343, 269, 49407  # CLIP BPE ids of <start>, "x</w>", "."
    assert ids[0, :10].tolist() == [sot, x, x, x, x, *bb.tokenize(["a red square"])[0, 1:4].tolist(), period, eot]
    assert torch.equal(ids, bb.tokenize(["X X X X a red square."]))
    # the routing keys read the same string through the frozen towers
    keys = method.frozen_text_features(["a red square"])
    torch.testing.assert_close(keys, F.normalize(bb.encode_text(bb.tokenize(["X X X X a red square."])), dim=-1))
    # evaluation (oracle task 0) encodes the same ids under task 0's prompts
    feats, _ = method.encode_texts_eval(["a red square"], torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(feats, method.encode_text(bb.tokenize(["X X X X a red square."]), method.task_plans(0)))
    plain = build_method({"name": "lpi", "n_tokens": 4, "layers": 4, "caption_suffix": ""}, bb)
    assert torch.equal(plain.tokenize(["a red square"]), bb.tokenize(["X X X X a red square"]))
