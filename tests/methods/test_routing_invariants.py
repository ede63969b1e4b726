"""Routing and per-task prompt invariants that a one-line change would break (issue 14, mutation testing): K-means
(seeding, restarts, the kept solution), the routers' masks, metric and tie rule, where S-Prompts/LPI prompts enter,
and which task's prompts encode each evaluation sample."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.methods import build_method
from vlprompt.methods.continual import prompt_pair_plans
from vlprompt.methods.routing import KMeansRouter, _kmeans_pp, kmeans


def test_kmeans_keeps_the_lowest_inertia_restart_and_returns_float32():
    # two tight pairs far apart plus a lone point: with k=2 the best solution puts one centre on each pair group
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [5.0, 40.0]], dtype=torch.float64)
    centres = kmeans(x, 3, n_init=10, seed=3)
    assert centres.dtype == torch.float32 and centres.shape == (3, 2)
    got = sorted(tuple(round(v, 4) for v in c.tolist()) for c in centres)
    assert got == [(0.0, 0.5), (5.0, 40.0), (10.0, 0.5)]  # the global optimum (inertia 1.0)
    inertia = float((torch.cdist(x.float(), centres).min(1).values ** 2).sum())
    assert inertia == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(kmeans(x, 3, seed=3), kmeans(x, 3, seed=3))  # seeded: reproducible
    assert kmeans(x, 1).tolist() == [pytest.approx([5.0, 8.4])]  # one centre: the mean


def test_kmeans_pp_seeds_distinct_points_and_repeats_when_all_coincide():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    for seed in range(5):
        centres = _kmeans_pp(x, 2, torch.Generator().manual_seed(seed))
        assert sorted(c.tolist() for c in centres) == [[0.0, 0.0], [3.0, 4.0]]  # never the same point twice
    same = torch.zeros(4, 2, dtype=torch.float64)
    assert _kmeans_pp(same, 3, torch.Generator().manual_seed(0)).shape == (3, 2)


def test_router_distances_mask_missing_keys_and_ties_go_to_the_earlier_task():
    router = KMeansRouter(num_tasks=3, dim=2, keys_per_task=2)
    router.fit_task(0, torch.tensor([[1.0, 0.0]]))  # one point: one valid key, the other masked
    router.fit_task(1, torch.tensor([[-1.0, 0.0], [0.0, 4.0]]))
    assert router.valid.tolist() == [[True, False], [True, True], [False, False]]
    assert router.fitted_tasks() == 2
    d = router.distances(torch.tensor([[0.0, 0.0], [0.0, 3.0]]))  # L1 to the nearest valid key of tasks 0, 1
    assert d.tolist() == [[1.0, 1.0], [4.0, 1.0]]  # a zero key slot (masked) would have given distance 0 and 3
    assert router.route(torch.tensor([[0.0, 0.0]])).tolist() == [0]  # a tie: the earlier task
    router.fit_task(0, torch.tensor([[2.0, 2.0], [3.0, 3.0]]))  # refitting replaces the old keys entirely
    assert router.valid[0].tolist() == [True, True] and sorted(router.keys[0].sum(1).tolist()) == [4.0, 6.0]


def test_prompt_pair_plans_enter_slice_0_and_add_the_deeper_slices():
    pv, pt = torch.randn(4, 2, 6), torch.randn(4, 2, 5)
    plans = prompt_pair_plans(pv, pt, depth=3, before_ln_pre=False)
    assert torch.equal(plans.image.insert, pv[0]) and plans.image.insert_before_ln_pre is False
    assert sorted(plans.image.add) == [1, 2] and torch.equal(plans.image.add[2], pv[2])
    assert sorted(plans.text.replace) == [0] and torch.equal(plans.text.replace[0], pt[0])
    assert sorted(plans.text.add) == [1, 2] and torch.equal(plans.text.add[1], pt[1])
    default = prompt_pair_plans(pv, pt)
    assert default.image.add == {} and default.text.add == {} and default.image.insert_before_ln_pre is True


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def test_task_methods_bound_tasks_keys_and_relation(tiny):
    method = build_method({"name": "sprompts", "num_tasks": 3, "n_tokens": 2, "n_keys": 4}, tiny)
    assert method.image_router.keys.shape == (3, 4, tiny.embed_dim) and method.text_router.keys.shape[1] == 4
    assert method.num_tasks == 3 and build_method({"name": "sprompts"}, tiny).num_tasks == 1
    method.begin_task(2)
    assert method.current_task == 2
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="outside"):
            method.begin_task(bad)
    method.set_task_relation([[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert method.task_relation.dtype == torch.float32 and method.task_relation[0, 2] == 1.0
    assert method.plans().image.insert is not None and torch.equal(
        method.plans().image.insert, method.prompts[2]()[0][0]
    )


def test_evaluation_routes_among_the_seen_tasks_and_encodes_with_each_samples_prompts(tiny):
    method = build_method({"name": "sprompts", "num_tasks": 3, "n_tokens": 2, "n_keys": 1}, tiny)
    torch.manual_seed(3)
    images = torch.randn(3, 3, tiny.image_size, tiny.image_size)
    captions = ["a red square", "a blue circle", "a green star"]
    image_keys, text_keys = method.frozen_image_features(images), method.frozen_text_features(captions)
    for t in range(3):
        method.fit_keys(t, image_keys[t : t + 1], text_keys[t : t + 1])
    method.begin_task(1)  # tasks 0 and 1 seen: sample 2 must go to one of them, never to task 2
    feats, routed = method.encode_images_eval(images)
    assert routed.tolist()[:2] == [0, 1] and routed[2] in (0, 1)
    for i in range(3):
        want = method.encode_image(images[i : i + 1], method.task_plans(int(routed[i])))
        torch.testing.assert_close(feats[i : i + 1], want)
    text_feats, text_routed = method.encode_texts_eval(captions)
    assert text_routed.tolist()[:2] == [0, 1] and text_routed[2] in (0, 1)
    for i in range(3):
        want = method.encode_text(method.tokenize(captions[i : i + 1]), method.task_plans(int(text_routed[i])))
        torch.testing.assert_close(text_feats[i : i + 1], want)
    oracle, used = method.encode_texts_eval(captions, torch.tensor([2, 2, 0]))
    assert used.tolist() == [2, 2, 0]
    torch.testing.assert_close(oracle[2:], method.encode_text(method.tokenize(captions[2:]), method.task_plans(0)))


def test_kmeans_defaults_and_seeds_reach_the_restarts():
    """S-Prompts/LPI: 5 keys per task, L1 routing; K-means seeded with 0 unless told otherwise. On a square the
    two optimal 2-means split it either way, so the seed decides which one is found."""
    square = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    by_seed = [kmeans(square, 2, seed=s) for s in (0, 1)]
    assert not torch.equal(*by_seed)  # the case can tell the seeds apart
    assert torch.equal(kmeans(square, 2), by_seed[0])
    router = KMeansRouter(num_tasks=3, dim=2, keys_per_task=2)
    assert router.num_tasks == 3 and router.metric == "l1"
    assert KMeansRouter(num_tasks=2, dim=4).keys.shape == (2, 5, 4)
    router.fit_task(0, square)
    router.fit_task(1, square, seed=1)
    assert torch.equal(router.keys[0], by_seed[0]) and torch.equal(router.keys[1], by_seed[1])


def test_kmeans_input_checks_and_degenerate_data():
    for bad in (torch.zeros(0, 2), torch.zeros(3)):
        with pytest.raises(ValueError, match="non-empty"):
            kmeans(bad, 2)
    dup = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert torch.isfinite(kmeans(dup, 3)).all()  # an empty cluster keeps its centre, never a NaN mean
    three = kmeans(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), 3).tolist()
    assert [1.0, 1.0] in three and [0.0, 0.0] in three  # a NaN restart would fall back to the first k points
    assert kmeans(torch.zeros(2, 6), 2).shape == (2, 6)  # fewer points than dimensions, all equal


def test_kmeans_pp_draws_by_squared_distance_even_at_small_scale():
    x = torch.tensor([[0.0, 0.0], [0.01, 0.0], [0.0, 0.02], [0.0, 0.0]], dtype=torch.float64)  # sums well below 1
    for seed in range(6):
        centres = _kmeans_pp(x, 3, torch.Generator().manual_seed(seed))
        assert len({tuple(c.tolist()) for c in centres}) == 3  # three distinct points, never a repeat


def test_router_distances_need_keys_for_every_asked_task_and_l2_is_euclidean():
    router = KMeansRouter(num_tasks=2, dim=2, keys_per_task=1, metric="l2")
    router.fit_task(0, torch.tensor([[3.0, 4.0]]))
    with pytest.raises(RuntimeError, match="keys for tasks 0..1"):
        router.distances(torch.zeros(1, 2), num_tasks=2)
    assert router.distances(torch.zeros(1, 2)).tolist() == [[pytest.approx(5.0)]]


def test_continual_methods_start_at_task_0_and_key_on_plain_captions(tiny):
    method = build_method({"name": "sprompts", "num_tasks": 2, "n_tokens": 2}, tiny)
    assert method.current_task == 0 and torch.equal(method.plans().image.insert, method.prompts[0]()[0][0])
    torch.manual_seed(5)
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    captions = ["a red square", "a blue circle"]
    with torch.no_grad():
        image_keys = method.frozen_image_features(images)
        torch.testing.assert_close(image_keys, torch.nn.functional.normalize(tiny.encode_image(images), dim=-1))
        text_keys = method.frozen_text_features(captions)  # S-Prompts: no placeholder words in the keys
        plain = torch.nn.functional.normalize(tiny.encode_text(tiny.tokenize(captions)), dim=-1)
        torch.testing.assert_close(text_keys, plain)


def test_the_vision_entry_point_option_reaches_the_plans(tiny):
    for name in ("sprompts", "lpi"):
        assert build_method({"name": name, "n_tokens": 2}, tiny).plans().image.insert_before_ln_pre is True
        after = build_method({"name": name, "n_tokens": 2, "insert_before_ln_pre": False}, tiny)
        assert after.plans().image.insert_before_ln_pre is False


def test_methods_without_routing_encode_evaluation_inputs_plainly(tiny):
    method = build_method({"name": "seqft", "num_tasks": 2, "n_tokens": 2}, tiny)
    torch.manual_seed(6)
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    with torch.no_grad():
        feats, tasks = method.encode_images_eval(images)
        assert tasks is None and torch.equal(feats, method.encode_image(images))
        text, tasks = method.encode_texts_eval(["a red square"])
        assert tasks is None and torch.equal(text, method.encode_text(["a red square"]))
