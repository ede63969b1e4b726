"""HiDe-Prompt invariants that a one-line change would break (issue 14, mutation testing): which prompt layers are
allowed, the options that reach the prompts, the TII head and the class statistics, what each task trains, the
statistics' features (the true task's prompt), what each end-of-task stage trains on (data, classes, optimizer,
epochs, rates), the training loss's prompt and its regulariser (weight, temperature, stored centroids), and the
routing of ``features`` without tasks."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vlprompt.backbone import load_backbone
from vlprompt.methods import build_method, hide
from vlprompt.methods.cil import mask_logits
from vlprompt.methods.hide import HiDeOptions
from vlprompt.methods.task_inference import contrastive_regularizer, fit_classifier
from vlprompt.prompts.dualprompt import prefix_plan

from .cil_helpers import SMALL, FixedLogits, tiny_cil

TO_TASK_0 = [9.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # class 0 wins: the TII routes every sample to task 0
TO_TASK_1 = [0.0, 0.0, 9.0, 0.0, 0.0, 0.0]  # class 2 wins: task 1


def _batch(tiny, task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All of task ``task``'s training images (6), their labels and frozen queries."""
    return next(iter(tiny.learner._batches(task)()))


def _z(method, images: torch.Tensor, task: int) -> torch.Tensor:
    """The prompted feature under task ``task``'s prompt, computed here from the prompts themselves."""
    tasks = torch.full((len(images),), task)
    return method.encode_prompted(images, prefix_plan(method.options.layers, method.prompts.gather(tasks)))


def _kept(keep: Any, num_classes: int = 6) -> list[int]:
    """The classes a ``keep`` argument leaves unmasked, read as ``fit_classifier`` reads it."""
    allowed = torch.zeros(num_classes, dtype=torch.bool)
    allowed[keep] = True
    return allowed.nonzero().flatten().tolist()


def test_defaults_are_hides_scripts():
    o = HiDeOptions()
    assert (o.layers, o.length, o.init, o.init_from_previous) == ([0, 1, 2, 3, 4], 5, "uniform", True)
    assert (o.momentum, o.reg, o.reg_temperature) == (0.01, 0.1, 0.8)
    assert (o.tii_epochs, o.tii_lr, o.tii_batch_size, o.tii_hidden_mult, o.tii_mask) == (20, 5e-4, 24, 2, "task")
    assert (o.centroids, o.align_epochs, o.align_lr, o.align_samples, o.align_batch_size) == (10, 30, 0.005, 24, 128)
    assert o.tap is True and o.predict_within_task is False


def test_prompt_layers_must_lie_in_the_image_towers_blocks():
    assert tiny_cil("hide_prompt", layers=[0, 3]).method.options.layers == [0, 3]  # the tiny tower has 4 blocks
    for bad in ([0, 4], [9], []):
        with pytest.raises(ValueError, match="prompt layers"):
            tiny_cil("hide_prompt", layers=bad)


def test_tii_mask_is_task_or_seen():
    assert tiny_cil("hide_prompt", tii_mask="seen").method.options.tii_mask == "seen"
    with pytest.raises(ValueError, match="tii_mask"):
        tiny_cil("hide_prompt", tii_mask="all")


def test_options_reach_the_prompts_the_tii_head_and_the_statistics():
    method = tiny_cil("hide_prompt", init="zero", tii_hidden_mult=3, centroids=3).method
    assert all(not p.detach().any() for p in method.prompts.prompts)  # init: zero
    uniform = tiny_cil("hide_prompt").method.prompts.prompts[0].detach()
    assert float(uniform.abs().max()) <= 1.0 and float(uniform.abs().min()) > 0.0  # U(-1, 1)
    assert method.prompts.prompts[0].shape == (2, 2, 2, method.backbone.vision_width)  # [layers, k/v, length, D]
    assert method.tii.mlp[0].out_features == 3 * method.query_dim  # D -> 3D -> D
    assert method.query_stats.means.shape == (6, 3, method.query_dim)  # centroids per class, on the queries
    assert method.feature_stats.means.shape == (6, 3, method.backbone.embed_dim)  # ... and on the prompted z


def test_hide_has_no_keys_and_one_task_trains_its_prompt_the_head_and_the_tii():
    torch.manual_seed(0)
    bare = build_method({"name": "hide_prompt", "num_tasks": 3, **SMALL["hide_prompt"]},
                        load_backbone("vlprompt-tiny", None))  # fmt: skip
    assert bare.parameter_counts()["trainable"] == bare.prompts.prompts[0].numel()  # before setup: no head, no TII
    method = tiny_cil("hide_prompt").method
    assert method.prompts.keys is None  # HiDe selects prompts with the TII head, not keys
    method.begin_task(1)
    trained = [method.prompts.prompts[1], method.head.weight]
    assert [id(p) for p in method.trainable_parameters()] == [id(p) for p in trained]
    assert [id(p) for p in method.learned_parameters()] == [id(p) for p in trained + list(method.tii.parameters())]
    per_task = sum(p.numel() for p in trained) + sum(p.numel() for p in method.tii.parameters())
    assert method.parameter_counts()["trainable"] == per_task
    keyed = tiny_cil("itprompt", key_weight=0.5).method  # a subclass with keys trains the current task's key too
    keyed.begin_task(1)
    ids = [id(p) for p in keyed.trainable_parameters()]
    assert id(keyed.prompts.keys[1]) in ids and id(keyed.prompts.keys[0]) not in ids


def test_statistics_are_of_the_true_tasks_prompted_features_after_the_momentum():
    tiny = tiny_cil("hide_prompt", centroids=1, init_from_previous=False, align_epochs=0)
    method = tiny.method.eval()
    method.begin_task(1)
    method.tii = FixedLogits(TO_TASK_0)  # a TII routing would take task 0's prompt
    method.end_task(1, tiny.learner._batches(1))
    images, labels, queries = _batch(tiny, 1)
    with torch.no_grad():
        z = _z(method, images, 1)  # the prompt after end_task (blended by the momentum) is the test-time one
        other = _z(method, images, 0)
    for c in (2, 3):
        assert int(method.feature_stats.counts[c, 0]) == 3
        torch.testing.assert_close(method.feature_stats.means[c, 0], z[labels == c].mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(method.query_stats.means[c, 0], queries[labels == c].mean(0), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(method.feature_stats.means[c, 0], other[labels == c].mean(0), atol=1e-3)


def _record(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``fit_classifier`` in ``hide`` by a recorder of its (named) arguments returning 1.234567."""
    calls: list[dict[str, Any]] = []
    signature = inspect.signature(fit_classifier)

    def record(*args: Any, **kwargs: Any) -> float:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return 1.234567

    monkeypatch.setattr(hide, "fit_classifier", record)
    return calls


def _run(tiny, tasks: int) -> list[dict[str, Any]]:
    infos = []
    for t in range(tasks):
        tiny.method.begin_task(t)
        infos.append(tiny.method.end_task(t, tiny.learner._batches(t)))
    return infos


def test_end_of_task_stages_train_the_tii_then_align_it_and_the_classifier(monkeypatch: pytest.MonkeyPatch):
    calls = _record(monkeypatch)
    tiny = tiny_cil("hide_prompt", tii_epochs=3, tii_lr=1e-3, tii_batch_size=5, align_epochs=4, align_lr=0.02,
                    align_batch_size=7, align_samples=3)  # fmt: skip
    method = tiny.method
    infos = _run(tiny, 2)
    assert infos[0] == {"tii_loss": 1.2346}  # no alignment after the first task; losses to 4 decimals
    assert infos[1] == {"tii_loss": 1.2346, "tii_align_loss": 1.2346, "tap_loss": 1.2346}
    assert len(calls) == 4
    tii_ids = [id(p) for p in method.tii.parameters()]
    _, _, queries = _batch(tiny, 1)
    for call, task in ((calls[0], 0), (calls[1], 1)):  # stage 1: Adam on the task's real frozen queries
        assert call["model"] is method.tii and [id(p) for p in call["params"]] == tii_ids
        x, y = call["sample"](0)
        assert sorted(set(y.tolist())) == [2 * task, 2 * task + 1] and _kept(call["keep"]) == [2 * task, 2 * task + 1]
        assert (call["epochs"], call["lr"], call["batch_size"]) == (3, 1e-3, 5)
        assert call["optimizer"] != "sgd"  # fit_classifier's Adam
    torch.testing.assert_close(calls[1]["sample"](0)[0], queries)
    align, tap = calls[2], calls[3]
    assert align["model"] is method.tii and [id(p) for p in align["params"]] == tii_ids
    assert tap["model"] == method.classify and [id(p) for p in tap["params"]] == [id(method.head.weight)]
    for call, dim in ((align, method.query_dim), (tap, method.backbone.embed_dim)):  # pseudo-queries / pseudo-z
        x, y = call["sample"](0)
        assert x.shape[1] == dim and sorted(set(y.tolist())) == [0, 1, 2, 3]  # every seen class
        assert _kept(call["keep"]) == [0, 1, 2, 3]
        assert (call["epochs"], call["lr"], call["batch_size"], call["optimizer"]) == (4, 0.02, 7, "sgd")


def test_tii_mask_seen_and_the_switches_of_the_alignment_stages(monkeypatch: pytest.MonkeyPatch):
    calls = _record(monkeypatch)
    _run(tiny_cil("hide_prompt", tii_mask="seen"), 2)
    assert _kept(calls[0]["keep"]) == [0, 1] and _kept(calls[1]["keep"]) == [0, 1, 2, 3]  # every seen class
    calls.clear()
    infos = _run(tiny_cil("hide_prompt", tap=False), 2)
    assert infos[1] == {"tii_loss": 1.2346, "tii_align_loss": 1.2346} and len(calls) == 3  # no TAP
    for epochs, stages in ((0, 1), (1, 3)):
        calls.clear()
        infos = _run(tiny_cil("hide_prompt", align_epochs=epochs), 2)
        assert len(calls) == 1 + stages and len(infos[1]) == stages  # align_epochs 0: no alignment at all


def test_training_takes_the_true_tasks_prompt_whatever_the_tii_says():
    tiny = tiny_cil("hide_prompt", reg=0.0, init_from_previous=False)
    method = tiny.method.eval()
    method.begin_task(1)
    method.tii = FixedLogits(TO_TASK_0)
    images, labels, query = _batch(tiny, 1)
    loss, terms = method.training_loss(images, labels, query)
    with torch.no_grad():
        ce = F.cross_entropy(mask_logits(method.classify(_z(method, images, 1)), slice(2, 4)), labels)
    assert terms == {"ce": pytest.approx(float(ce), rel=1e-5)}  # reg 0: no regulariser term at all
    assert float(loss.detach()) == pytest.approx(float(ce), rel=1e-5)
    loss.backward()
    assert method.prompts.prompts[1].grad is not None and float(method.prompts.prompts[1].grad.abs().sum()) > 0


def test_regulariser_has_its_weight_and_temperature_and_adds_the_earlier_classes_centroids():
    tiny = tiny_cil("hide_prompt", reg=0.3, reg_temperature=0.5)
    method = tiny.method.eval()
    method.begin_task(0)
    images, labels, query = _batch(tiny, 0)
    loss, terms = method.training_loss(images, labels, query)
    with torch.no_grad():
        reg = contrastive_regularizer(_z(method, images, 0), None, 0.5)  # task 0: the batch alone
    assert terms["reg"] == pytest.approx(float(reg), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(terms["ce"] + 0.3 * float(reg), rel=1e-5)
    feats = F.normalize(torch.randn(6, method.backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    method.feature_stats.fit(feats, torch.tensor([0, 0, 0, 1, 1, 1]))  # task 0's classes' centroids
    method.begin_task(1)
    images, labels, query = _batch(tiny, 1)
    loss, terms = method.training_loss(images, labels, query)
    stored, classes = method.feature_stats.centroid_means(2)
    assert sorted(set(classes.tolist())) == [0, 1]
    with torch.no_grad():
        z = _z(method, images, 1)
        reg, alone = contrastive_regularizer(z, stored, 0.5), contrastive_regularizer(z, None, 0.5)
    assert terms["reg"] == pytest.approx(float(reg), rel=1e-5) and float(reg) != pytest.approx(float(alone), rel=1e-3)
    assert float(loss.detach()) == pytest.approx(terms["ce"] + 0.3 * float(reg), rel=1e-5)


def test_training_loss_adds_a_subclasss_guidance():
    tiny = tiny_cil("itprompt", reg=0.2, text_weight=0.5)
    method = tiny.method.eval()
    method.begin_task(0)
    images, labels, query = _batch(tiny, 0)
    loss, terms = method.training_loss(images, labels, query)
    assert set(terms) == {"ce", "reg", "text"} and terms["text"] > 0
    assert float(loss.detach()) == pytest.approx(terms["ce"] + 0.2 * terms["reg"] + 0.5 * terms["text"], rel=1e-5)


def test_features_without_tasks_route_through_the_tii():
    tiny = tiny_cil("hide_prompt")
    method = tiny.method.eval()
    method.set_current_task(1)
    images, _, query = _batch(tiny, 1)
    with torch.no_grad():
        by_task = {t: method.features(images, query, torch.full((len(images),), t))[0] for t in (0, 1)}
        assert not torch.allclose(by_task[0], by_task[1], atol=1e-3)
        for logits, task in ((TO_TASK_0, 0), (TO_TASK_1, 1)):
            method.tii = FixedLogits(logits)
            z, aux = method.features(images, query, None)
            torch.testing.assert_close(z, by_task[task])
            assert float(aux) == 0.0
