"""RVLR add-on: the spec's B9 invariants (relations, lambda limits, zero loss at the target, frozen teachers,
soft targets, single-process = 2-process loss), options, and training end to end through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import vlprompt
from vlprompt.config import DataConfig, load_config
from vlprompt.core.trainer import train
from vlprompt.data.features import FeatureCache
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.baselines import FullFinetune
from vlprompt.methods.rvlr import (
    gather_with_grad,
    off_diagonal,
    relation_distance,
    relation_matrix,
    soft_targets,
    teacher_mix,
)
from vlprompt.runners.eval_run import evaluate_target

DIMS = {"image_teacher_dim": 12, "text_teacher_dim": 10}


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _feats(b: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def test_relation_matrices_symmetric_off_diagonal_and_permutation_invariant() -> None:
    x = _feats(6, 5, 0)
    r = relation_matrix(x, 0.07)
    torch.testing.assert_close(r, r.T)
    off = off_diagonal(r)
    assert off.numel() == 6 * 5
    torch.testing.assert_close(off.max(), r[~torch.eye(6, dtype=torch.bool)].max())
    assert not torch.isclose(off, torch.tensor(1 / 0.07)).any()  # the diagonal (self relation) is gone
    a, b, u = _feats(6, 7, 1), _feats(6, 9, 2), _feats(6, 5, 3)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(4))

    def loss(u, a, b):
        target = teacher_mix(off_diagonal(relation_matrix(a, 0.07)), off_diagonal(relation_matrix(b, 0.07)), 0.3)
        return relation_distance(off_diagonal(relation_matrix(u, 0.07)), target)

    torch.testing.assert_close(loss(u, a, b), loss(u[perm], a[perm], b[perm]))


def test_lambda_limits_and_constant_teacher_terms() -> None:
    rv, rt = off_diagonal(relation_matrix(_feats(8, 4, 0), 0.07)), off_diagonal(relation_matrix(_feats(8, 6, 1), 0.07))
    torch.testing.assert_close(teacher_mix(rv, rt, 1.0), rt)
    torch.testing.assert_close(teacher_mix(rv, rt, 0.0), rv)
    sums = [relation_distance(rv, teacher_mix(rv, rt, lam)) + relation_distance(rt, teacher_mix(rv, rt, lam))
            for lam in (0.2, 0.5, 0.8)]  # fmt: skip
    for s in sums[1:]:
        torch.testing.assert_close(s, sums[0])
    outside = relation_distance(rv, teacher_mix(rv, rt, 1.5)) + relation_distance(rt, teacher_mix(rv, rt, 1.5))
    assert outside > sums[0]  # outside [0, 1] the pair pushes lambda back


def test_zero_loss_and_gradient_when_student_relations_equal_the_target() -> None:
    a, b = _feats(6, 8, 0), _feats(6, 8, 1)
    for lam, teacher in ((0.0, a), (1.0, b)):
        u = teacher.clone().requires_grad_(True)
        target = teacher_mix(off_diagonal(relation_matrix(a, 0.07)), off_diagonal(relation_matrix(b, 0.07)), lam)
        for kind in ("mae", "mse", "cumsum_mae"):
            loss = relation_distance(off_diagonal(relation_matrix(u, 0.07)), target, kind)
            (grad,) = torch.autograd.grad(loss, u)
            assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
            assert float(grad.abs().max()) == pytest.approx(0.0, abs=1e-5)


def test_soft_targets_rows_sum_to_one_and_duplicates_are_positives() -> None:
    q = soft_targets(torch.tensor([3, 1, 3, 7, 3]))
    torch.testing.assert_close(q.sum(1), torch.ones(5))
    assert q[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3])
    assert q[1].tolist() == [0, 1, 0, 0, 0]


def test_without_distillation_and_duplicates_it_is_the_clip_loss(tiny) -> None:
    rvlr = build_method({"name": "rvlr", "w_rep_image": 0, "w_rep_text": 0, "w_kd": 0}, tiny)
    images = torch.randn(4, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    tokens = rvlr.tokenize(["a red square", "a blue circle", "a star", "two marks"])
    with torch.no_grad():
        ours = rvlr(images, tokens, visual_index=torch.tensor([0, 1, 2, 3]))
        u, t = rvlr.encode_image(images), rvlr.encode_text(tokens)
        reference = ClipLoss()(u, t, rvlr.logit_scale)
        both_same = rvlr(images, tokens, visual_index=torch.tensor([0, 0, 2, 3]))
    torch.testing.assert_close(ours, reference)
    assert not torch.isclose(both_same, ours)  # two captions of one image: both positives
    assert rvlr.last_terms.keys() == {"clip"}


def test_options_and_parameters(tiny, monkeypatch) -> None:
    coop = build_method({"name": "rvlr", "base": {"name": "coop", "n_ctx": 2}, **DIMS}, tiny)
    e = tiny.embed_dim
    assert coop.parameter_counts()["trainable"] == 2 * tiny.text_width + (12 * e + e) + (10 * e + e) + 1
    assert coop.tokenize(["x"]).shape == coop.base.tokenize(["x"]).shape  # CoOp's placeholders kept
    fixed = build_method({"name": "rvlr", "learn_lambda": False, **DIMS}, tiny)
    assert not fixed.lam.requires_grad and not fixed.tau2.requires_grad
    with pytest.raises(ConfigError, match="cumsum_mae"):
        build_method({"name": "rvlr", "distance": "kl", **DIMS}, tiny)
    with pytest.raises(ConfigError, match="base must name"):
        build_method({"name": "rvlr", "base": {"name": "rvlr"}, **DIMS}, tiny)
    with pytest.raises(ConfigError, match="features extract"):
        build_method({"name": "rvlr", "image_teacher": "/nonexistent"}, tiny)
    monkeypatch.setattr(FullFinetune, "forward", lambda self, *a, **k: None)
    with pytest.raises(ConfigError, match="its own loss"):
        build_method({"name": "rvlr", **DIMS}, tiny)


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    tiny = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)
    method = build_method({"name": "rvlr", **DIMS}, tiny)
    u, t, a, b = (F.normalize(_feats(8, d, s), dim=-1) for d, s in ((128, 0), (128, 1), (12, 2), (10, 3)))
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])
    local = slice(4 * rank, 4 * rank + 4)
    u_local = u[local].clone().requires_grad_(True)
    parts = [gather_with_grad(x) for x in (u_local, t[local], ids[local], a[local], b[local])]
    loss = method.total(method.loss_terms(*parts[:3], parts[3], parts[4]))
    (grad_local,) = torch.autograd.grad(loss, u_local)
    u_full = u.clone().requires_grad_(True)
    full = method.total(method.loss_terms(u_full, t, ids, a, b))
    (grad_full,) = torch.autograd.grad(full, u_full)
    # DDP averages the ranks' gradients: (1/2) * (sum over both ranks' losses) must give the single-process one
    grad_error = float((grad_local / 2 - grad_full[local]).abs().max())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps([float(loss), float(full), grad_error]))
    dist.destroy_process_group()


def test_single_process_loss_equals_two_process_gathered_loss(tmp_path: Path) -> None:
    # spawn, not fork: a fork after torch started its OpenMP threads deadlocks the children
    args = (str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_gather_worker, args=args, nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        gathered, full, grad_error = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert gathered == pytest.approx(full, rel=1e-6)
        assert grad_error < 1e-6


def _config(tmp_path: Path, root: Path, image: Path, text: Path) -> Path:
    cfg = tmp_path / "rvlr.yaml"
    cfg.write_text(
        "backbone: {name: vlprompt-tiny, pretrained: null}\n"
        f"method: {{name: rvlr, base: {{name: finetune}}, image_teacher: {image}, text_teacher: {text}}}\n"
        f"data: {{root: {root}, train: train.json, test: test.json}}\n"
        f"train: {{epochs: 1, batch_size: 6, lr: 0.001}}\nout_dir: {tmp_path / 'runs'}\n"
    )
    return cfg


def test_training_keeps_teachers_frozen_and_evaluates(image_text_set, teachers, tmp_path, monkeypatch) -> None:
    image, text = teachers
    before = {p.name: p.read_bytes() for folder in teachers for p in sorted(folder.iterdir())}
    seen: list[tuple[torch.Tensor, ...]] = []
    original = vlprompt.methods.rvlr.RVLR.teacher_features

    def spy(self, visual_index, sample_index):
        feats = original(self, visual_index, sample_index)
        seen.append((visual_index, sample_index, *feats))
        return feats

    monkeypatch.setattr(vlprompt.methods.rvlr.RVLR, "teacher_features", spy)
    cfg = load_config(_config(tmp_path, image_text_set, image, text))
    result = train(cfg, progress=False)
    assert result["steps"] == 4 and seen
    after = {p.name: p.read_bytes() for folder in teachers for p in sorted(folder.iterdir())}
    assert after == before  # the caches on disk are untouched
    FeatureCache(image).verify(deep=True)
    # each batch's teacher rows are the features of exactly its images and captions
    pairs = vlprompt.data.ImageTextPairs(image_text_set / "train.json", image_text_set, None)
    text_cache = FeatureCache(text)
    from vlprompt.data.features import caption_sample_id, image_sample_id

    for visual_index, sample_index, a, b in seen:
        assert not a.requires_grad and not b.requires_grad
        caps = [pairs.pairs[int(i)] for i in sample_index]
        assert [img for img, _ in caps] == visual_index.tolist()
        ids = [caption_sample_id(image_sample_id(pairs.image_paths[img], image_text_set), c) for img, c in caps]
        torch.testing.assert_close(b, torch.from_numpy(text_cache.lookup(ids)))
    metrics = evaluate_target(tmp_path / "runs" / "rvlr", [], "test", "all")
    assert {"t2i/R@1", "i2i/NDCG@10", "t2t/NDCG@10", "i2it/NDCG@10", "t2it/NDCG@10"} <= set(metrics)


def test_training_moves_student_heads_and_lambda_not_teachers(tiny, teachers, image_text_set) -> None:
    image, text = teachers
    method = build_method({"name": "rvlr", "image_teacher": str(image), "text_teacher": str(text)}, tiny)
    pairs = vlprompt.data.ImageTextPairs(image_text_set / "train.json", image_text_set, tiny.preprocess_val)
    method.bind_train_set(pairs, DataConfig(root=str(image_text_set)))
    items = [pairs[i] for i in range(6)]
    images = torch.stack([x[0] for x in items])
    tokens = method.tokenize([x[1] for x in items])
    visual_index, sample_index = torch.tensor([x[2] for x in items]), torch.arange(6)
    a0, b0 = method.teacher_features(visual_index, sample_index)
    loss = method(images, tokens, None, sample_index=sample_index, visual_index=visual_index)
    loss.backward()
    assert set(method.last_terms) == {"clip", "rep_image", "rep_text", "kd", "kd_image", "kd_text"}
    assert method.lam.grad is not None and method.rep_image.weight.grad is not None
    assert tiny.model.visual.conv1.weight.grad is not None  # full fine-tuning: the towers train
    a1, b1 = method.teacher_features(visual_index, sample_index)
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(b0, b1)
    tiny.model.zero_grad(set_to_none=True)
    method.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="sample_index"):
        method(images, tokens)
