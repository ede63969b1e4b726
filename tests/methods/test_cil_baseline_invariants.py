"""Invariants of the class-incremental base (label masking, heads, scales) and of L2P, DualPrompt and CODA-Prompt:
which prompts feed ``z``, which tasks' components are used, each auxiliary term's inputs and constants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.methods.cil import mask_logits
from vlprompt.prompts.dualprompt import prefix_plan

from .cil_helpers import tiny_cil


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g)


def batch(method, n: int = 4):
    x = images(n, method.backbone.image_size)
    return x, method.query_features(x)


# ---- ClassIncrementalMethod --------------------------------------------------------------------------------
def test_num_classes_is_zero_before_setup_and_task_range_is_checked():
    tiny = tiny_cil("zeroshot_cil")
    method = tiny.method
    assert method.num_classes == 6
    method.offsets = []
    assert method.num_classes == 0
    method.set_current_task(2)
    with pytest.raises(ValueError):
        method.set_current_task(3)


@pytest.mark.parametrize("num_tasks", [0, 1, 3])
def test_a_new_method_holds_empty_non_persistent_buffers_until_setup(num_tasks):
    """Before ``setup``: task 0 current, no classes, empty anchors ``[0, D]`` and an empty long class-to-task map,
    both buffers (they follow ``.to()``) but not in the state dict (``setup`` rebuilds them from the class split);
    ``num_tasks`` as given, at least 1."""
    from vlprompt.backbone import load_backbone
    from vlprompt.methods import build_method

    backbone = load_backbone("vlprompt-tiny", None)
    method = build_method({"name": "zeroshot_cil", "num_tasks": num_tasks}, backbone)
    assert method.num_tasks == max(1, num_tasks or 0)
    assert method.current_task == 0 and method.offsets == [] and method.num_classes == 0
    buffers = dict(method.named_buffers())
    assert buffers["text_anchors"].shape == (0, backbone.embed_dim)
    assert buffers["class_task"].shape == (0,) and buffers["class_task"].dtype == torch.long
    state = method.state_dict()
    assert not any(k.endswith(("text_anchors", "class_task")) for k in state)
    split_sizes = [2, 2, 2][: method.num_tasks] if num_tasks else [2]
    method.setup(split_sizes, F.normalize(torch.randn(sum(split_sizes), backbone.embed_dim), dim=-1))
    assert method.class_task.dtype == torch.long and method.class_task.tolist() == sum(
        ([t] * n for t, n in enumerate(split_sizes)), []
    )


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_learned_heads_bias_and_text_init(head: str):
    method = tiny_cil("zeroshot_cil", head=head, head_init="text").method
    anchors = method.text_anchors
    assert torch.allclose(anchors.norm(dim=-1), torch.ones(6), atol=1e-5)
    scale = float(method.backbone.logit_scale) if head == "linear" else 1.0
    assert torch.allclose(method.head.weight, anchors * scale, atol=1e-6)  # linear: CLIP's zero-shot logits
    assert (method.head.bias is not None) == (head == "linear")
    if head == "linear":
        assert torch.count_nonzero(method.head.bias) == 0
    default = tiny_cil("zeroshot_cil", head=head).method  # nn.Linear's own init, not the anchors
    assert not torch.allclose(default.head.weight, default.text_anchors, atol=1e-3)


def test_classify_linear_cosine_and_head_scale():
    z = F.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    lin = tiny_cil("zeroshot_cil", head="linear").method
    with torch.no_grad():
        lin.head.bias.fill_(0.5)
    assert torch.allclose(lin.classify(z), lin.head(z), atol=1e-6)  # W z + b, no normalisation
    for s in (5.0, 0.5):
        cos = tiny_cil("zeroshot_cil", head="cosine", head_scale=s).method
        expected = s * z @ F.normalize(cos.head.weight, dim=-1).T
        assert torch.allclose(cos.classify(z), expected, atol=1e-5)
    clip = tiny_cil("zeroshot_cil", head="cosine").method  # 0 = CLIP's logit scale
    expected = clip.backbone.logit_scale * z @ F.normalize(clip.head.weight, dim=-1).T
    assert torch.allclose(clip.classify(z), expected, atol=1e-5)


def test_train_mask_task_and_seen():
    pos = torch.arange(6.0)[None]
    for mask, t, kept in (("task", 1, [2, 3]), ("seen", 1, [0, 1, 2, 3]), ("seen", 0, [0, 1])):
        method = tiny_cil("zeroshot_cil", train_mask=mask).method
        method.set_current_task(t)
        out = mask_logits(pos, method.train_keep())
        assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept


def test_query_embedding_and_unit_norm_features():
    method = tiny_cil("l2p_cil", query="embedding").method
    assert method.query_dim == method.backbone.embed_dim != method.backbone.vision_width
    assert method.pool.keys.shape[-1] == method.backbone.embed_dim
    x = images(4, method.backbone.image_size)
    q = method.query_features(x)
    with torch.no_grad():
        expected = method.backbone.vision(x, None).pooled.float()
    assert q.shape == (4, method.backbone.embed_dim)
    assert torch.allclose(q, expected, atol=1e-5)
    z = method.encode_prompted(x, None)
    assert torch.allclose(z.norm(dim=-1), torch.ones(4), atol=1e-5)  # each row unit-norm


def test_training_loss_is_masked_ce_plus_aux_with_named_logs():
    method = tiny_cil("dualprompt", pull_weight=0.7).method
    method.begin_task(1)
    method.train()
    x, q = batch(method)
    labels = torch.tensor([2, 3, 3, 2])
    torch.manual_seed(0)
    loss, logs = method.training_loss(x, labels, q)
    assert set(logs) == {"ce", "aux"}
    z, aux = method.features(x, q, torch.ones(4, dtype=torch.long))  # the true task's E-prompt
    logits = method.classify(z)[:, 2:4]  # task 1's classes only
    ce = F.cross_entropy(logits, labels - 2)
    assert logs["aux"] > 0.1
    assert logs["ce"] == pytest.approx(float(ce.detach()), abs=1e-4)
    assert logs["aux"] == pytest.approx(float(aux.detach()), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ce) + float(aux.detach()), abs=1e-4)


# ---- CODA-Prompt ---------------------------------------------------------------------------------------------
def test_coda_uses_components_of_tasks_up_to_current_and_ortho_term():
    method = tiny_cil("coda_prompt", ortho_weight=0.5).method
    method.begin_task(0)
    method.begin_task(1)
    method.set_current_task(0)  # task 1's (non-zero) components exist but must not be used
    with torch.no_grad():  # away from orthonormal, so that the penalty is clearly non-zero
        method.pool.k[0].mul_(2.0)
        method.pool.k[1].mul_(3.0)
    x, q = batch(method)
    method.eval()
    with torch.no_grad():
        z, aux = method.features(x, q, None)
        prefix, _ = method.pool(q, 1)
        expected = method.encode_prompted(x, prefix_plan(method.options.layers, prefix))
        plain = method.encode_prompted(x, None)
    assert torch.allclose(z, expected, atol=1e-5)
    assert not torch.allclose(z, plain, atol=1e-3)  # the prefix reaches z
    assert float(aux.detach()) == 0.0  # no penalty at evaluation
    method.train()
    _, aux = method.features(x, q, torch.zeros(4, dtype=torch.long))
    assert float(aux.detach()) == pytest.approx(0.5 * float(method.pool.orthogonality(1)), rel=1e-5)
    others = [float(method.pool.orthogonality(n)) for n in (2, 3)]
    assert all(abs(o - float(method.pool.orthogonality(1))) > 0.01 for o in others)


def test_coda_default_ortho_weight_adds_the_penalty_and_zero_weight_none():
    method = tiny_cil("coda_prompt").method
    method.begin_task(0)
    method.train()
    x, q = batch(method)
    with torch.no_grad():
        method.pool.k[0].mul_(3.0)  # a clearly non-zero penalty
    _, aux = method.features(x, q, torch.zeros(4, dtype=torch.long))
    assert float(aux.detach()) == pytest.approx(1e-7 * float(method.pool.orthogonality(1)), rel=1e-5)
    assert float(aux.detach()) > 0
    zero = tiny_cil("coda_prompt", ortho_weight=0.0).method
    zero.begin_task(0)
    zero.train()
    loss, logs = zero.training_loss(x, torch.tensor([0, 1, 0, 1]), q)
    assert logs["aux"] == 0.0


def test_coda_text_head_and_layer_range():
    method = tiny_cil("coda_prompt", head="text").method
    method.begin_task(0)
    assert method.trainable_parameters() == [method.pool.p[0], method.pool.k[0], method.pool.a[0]]
    with pytest.raises(ValueError):
        tiny_cil("coda_prompt", layers=[0, 4])  # tiny tower has layers 0..3


# ---- DualPrompt ----------------------------------------------------------------------------------------------
def keyed_dualprompt(**options):
    """DualPrompt after task 1 whose queries all match task 0's key (so routing picks 0, the true task is 1)."""
    method = tiny_cil("dualprompt", **options).method
    method.begin_task(0)
    method.begin_task(1)
    x, q = batch(method)
    with torch.no_grad():
        method.prompts.e.keys[0].copy_(q.mean(0))
        method.prompts.e.keys[1].copy_(-q.mean(0))
    return method, x, q


def test_dualprompt_training_uses_the_true_task_and_test_routes():
    method, x, q = keyed_dualprompt()
    method.eval()
    assert method.route(q).tolist() == [0, 0, 0, 0]
    with torch.no_grad():
        ones = torch.ones(4, dtype=torch.long)
        z_true, aux = method.features(x, q, ones)
        assert torch.allclose(z_true, method.encode_prompted(x, method.prompts.plan(ones)), atol=1e-5)
        z_routed, aux_eval = method.features(x, q, None)
        zeros = torch.zeros(4, dtype=torch.long)
        assert torch.allclose(z_routed, method.encode_prompted(x, method.prompts.plan(zeros)), atol=1e-5)
        assert not torch.allclose(z_true, z_routed, atol=1e-3)
        assert float(aux.detach()) == 0.0 and float(aux_eval) == 0.0
        logits, routed = method.predict(x, q, ones)  # oracle routing honoured
        assert routed.tolist() == [1, 1, 1, 1]
        assert torch.allclose(logits, method.classify(z_true)[:, :4], atol=1e-4)
        _, routed = method.predict(x, q)
        assert routed.tolist() == [0, 0, 0, 0]


def test_dualprompt_pull_loss_on_the_current_key():
    method, x, q = keyed_dualprompt(pull_weight=0.3)
    method.train()
    with torch.no_grad():
        method.prompts.e.keys[1].copy_(torch.randn(q.shape[-1], generator=torch.Generator().manual_seed(3)))
    _, aux = method.features(x, q, torch.ones(4, dtype=torch.long))
    cos = F.normalize(q, dim=-1) @ F.normalize(method.prompts.e.keys[1].detach(), dim=-1)
    assert float(aux.detach()) == pytest.approx(0.3 * float((1 - cos).mean()), abs=1e-5)


def test_dualprompt_options_and_trainable_parameters():
    method = tiny_cil("dualprompt", init="zero").method
    assert all(torch.count_nonzero(p) == 0 for p in method.prompts.e.prompts)
    assert torch.count_nonzero(method.prompts.g) == 0
    method.begin_task(1)
    assert [p.requires_grad for p in method.prompts.e.prompts] == [False, True, False]
    assert [k.requires_grad for k in method.prompts.e.keys] == [False, True, False]
    text = tiny_cil("dualprompt", head="text", g_layers=[]).method
    text.begin_task(0)
    e = text.prompts.e
    assert text.trainable_parameters() == [e.prompts[0], e.keys[0]]
    with pytest.raises(ValueError):
        tiny_cil("dualprompt", e_layers=[1, 4])


# ---- L2P -----------------------------------------------------------------------------------------------------
def test_l2p_options_reach_the_pool():
    method = tiny_cil("l2p_cil", top_k=3, init="zero").method
    assert method.pool.top_k == 3
    assert torch.count_nonzero(method.pool.prompts) == 0 and torch.count_nonzero(method.pool.keys) == 0
    with pytest.raises(ValueError):
        tiny_cil("l2p_cil", layers=[4])


@pytest.mark.parametrize("batchwise", [False, True])
def test_l2p_features_use_the_selected_prompts_and_pull_term(batchwise: bool):
    method = tiny_cil("l2p_cil", batchwise_train=batchwise, pull_weight=0.4).method
    x, q = batch(method, 6)
    per_sample = method.pool(q).indices
    assert len({tuple(r) for r in per_sample.tolist()}) > 1  # the data makes the two selections differ
    method.train()
    z, aux = method.features(x, q, None)
    sel = method.pool(q, batchwise=batchwise)
    b, _, n, d = sel.prompts.shape
    plan = prefix_plan(method.options.layers, sel.prompts.view(b, 1, 2, n, d))
    assert torch.allclose(z, method.encode_prompted(x, plan), atol=1e-5)
    assert not torch.allclose(z, method.encode_prompted(x, None), atol=1e-3)
    assert float(aux.detach()) == pytest.approx(0.4 * float(sel.pull_loss), rel=1e-5)
    method.eval()
    with torch.no_grad():
        z, aux = method.features(x, q, None)  # evaluation: per-sample selection, no pull term
        sel = method.pool(q)
        plan = prefix_plan(method.options.layers, sel.prompts.view(b, 1, 2, n, d))
        assert torch.allclose(z, method.encode_prompted(x, plan), atol=1e-5)
    assert float(aux.detach()) == 0.0
