"""L2P for grounding: ONE shared visual pool (parameters from the shapes, independent of the task count), selection
by the frozen image feature (batch-wise majority only in training), prompts inserted after CLS and dropped before the
heads, REC + 0.1 pull loss, everything of the pool trains in every task, no routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone import PromptPlan
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method, list_methods
from vlprompt.methods.continual import ContinualMethod
from vlprompt.methods.continual_grounding import TaskGroundingMethod
from vlprompt.methods.grounding import GroundingOptions, rec_loss
from vlprompt.methods.l2p_ground import L2PGround, L2PGroundOptions

from .ground_helpers import EXPRESSIONS, TARGETS, grads, images, tiny, trainable, vit_b16


def _method(**kw) -> L2PGround:
    torch.manual_seed(3)
    return L2PGround(tiny(), L2PGroundOptions(**kw))


def _keyed(n: int = 4, **kw) -> tuple[L2PGround, torch.Tensor]:
    """A pool of ``n`` one-token prompts whose key ``j`` is closest to image ``j``'s frozen feature, by a margin."""
    kw = {"pool_size": n, "length": 2, "pool_top_k": 1, **kw}
    m = _method(**kw)
    imgs = images(n, seed=7)
    feats = m.frozen_image_features(imgs)
    with torch.no_grad():
        m.pool.keys.copy_(torch.linalg.pinv(feats).T)  # feats @ keys.T = identity: key j points at image j only
    sim = m.pool.similarity(feats)
    off = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    assert (sim.diagonal() - off.max(dim=1).values).min() > 1e-2  # a clear margin, whatever the kernel
    return m, imgs


def test_defaults_are_lpis_l2p_setting():
    o = L2PGroundOptions()
    assert isinstance(o, GroundingOptions)
    assert (o.pool_size, o.length, o.pool_top_k) == (12, 4, 4)  # 16 prompt tokens
    assert o.batchwise_train and o.pull_weight == 0.1 and o.init == "uniform"
    assert o.top_k == 10  # the boxes kept at evaluation stay GroundingOptions'
    assert "l2p_ground" in list_methods()
    m = build_method({"name": "l2p_ground", "num_tasks": 3}, tiny())
    assert isinstance(m, L2PGround) and isinstance(m, ContinualMethod) and not isinstance(m, TaskGroundingMethod)
    assert not m.uses_keys and m.num_tasks == 3


def test_one_shared_pool_whatever_the_task_count():
    m1, m3 = _method(num_tasks=1), _method(num_tasks=3)
    b = m1.backbone
    shared = 12 * 4 * b.vision_width + 12 * b.embed_dim
    assert trainable(m1) == trainable(m3) == shared
    m3.begin_task(2)  # every task trains the whole pool
    assert trainable(m3) == shared
    assert all(not p.requires_grad for p in [*m3.backbone.parameters(), *m3.detector.parameters()])
    for p in (m3.pool.prompts, m3.pool.keys):  # L2P's U(-1, 1)
        assert float(p.detach().abs().max()) <= 1.0 and 0.5 < float(p.detach().std()) < 0.65


def test_vit_b16_count():
    m = L2PGround(vit_b16(), L2PGroundOptions(num_tasks=12))
    assert m.pool.prompts.shape == (12, 1, 4, 768) and m.pool.keys.shape == (12, 512)
    assert trainable(m) == 12 * 4 * 768 + 12 * 512 == 43_008


def test_each_image_gets_the_prompts_of_its_closest_keys_inserted_after_cls():
    m, imgs = _keyed()
    m.eval()
    tokens = m.tokenize(["a", "b", "c", "d"])
    assert m.select(imgs).indices.flatten().tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        out = m.ground(imgs, tokens)
        want = m.detector(imgs, tokens[:, None], PromptPlan(insert=m.pool.prompts[:, 0]), None)
        swapped = m.detector(imgs, tokens[:, None], PromptPlan(insert=m.pool.prompts[[1, 0, 3, 2], 0]), None)
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.boxes, want.boxes)
    gh, gw = m.detector.grid
    assert out.features.shape[1] == gh * gw  # the patches only: the inserted prompt tokens are dropped
    assert (swapped.logits - out.logits).abs().max() > 1e-4
    pred = m.predict(imgs, tokens, torch.tensor([[64, 64]] * 4), k=2)
    assert pred.tasks is None  # no routing
    top = want.logits[..., 0].sort(dim=-1, descending=True, stable=True).values[:, :2]
    torch.testing.assert_close(pred.scores, top)


def test_batchwise_majority_only_while_training():
    m, imgs = _keyed()
    batch = imgs[[0, 0, 1]]  # prompt 0 is the majority
    m.train()
    assert m.select(batch).indices.flatten().tolist() == [0, 0, 0]
    m.eval()
    assert m.select(batch).indices.flatten().tolist() == [0, 0, 1]
    m2, _ = _keyed(batchwise_train=False)
    m2.train()
    assert m2.select(batch).indices.flatten().tolist() == [0, 0, 1]


def test_loss_is_rec_plus_weighted_pull_and_trains_the_pool():
    m, imgs = _keyed(pool_size=4, pool_top_k=2)
    m.train()
    imgs, tokens = imgs[:2], m.tokenize(EXPRESSIONS)
    sel = m.select(imgs)
    idx = sel.indices
    assert idx[0].tolist() == idx[1].tolist()  # batch-wise: one choice for the batch
    loss = m(imgs, tokens, TARGETS)
    with torch.no_grad():
        out = m.ground(imgs, tokens, m.pool_plans(sel))
        rec, _, _ = rec_loss(out.logits[..., 0], out.boxes, TARGETS, m.options)
        q, k = m.frozen_image_features(imgs), F.normalize(m.pool.keys, dim=-1)
        pull = (1 - (q[:, None] * k[idx]).sum(-1)).sum(1).mean()
    torch.testing.assert_close(loss.detach(), rec + 0.1 * pull)
    assert set(m.loss_terms) == {"class", "l1", "giou", "pull"}
    assert m.loss_terms["pull"] == pytest.approx(float(pull), rel=1e-5)
    loss.backward()
    assert grads(m) == {"pool.prompts", "pool.keys"}
    chosen = m.pool.prompts.grad.flatten(1).abs().sum(1) > 0
    assert chosen.tolist() == [i in idx[0].tolist() for i in range(4)]  # only the chosen prompts move


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="pool_top_k"):
        _method(pool_size=3, pool_top_k=4)
