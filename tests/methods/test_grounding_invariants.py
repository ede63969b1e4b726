"""Grounding invariants that a one-line change would break (issue 14, mutation testing): which options reach DETR's
match and loss, GIoU per expression, what predict takes (given plans, clipping, its checks, other dtypes), what the
constructors pass on (a ready detector, train_heads, objectness, n_keys, the interaction's mix, init scales, L2P's
pool), the interaction's depth bound and precision, LPI's task term, and evaluation answering every row with its
routed task's prompts."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone.detector import Detector
from vlprompt.methods.base import Plans
from vlprompt.methods.continual_grounding import (
    TaskGroundingMethod,
    TaskGroundingOptions,
    grounding_plans,
    prompt_interaction,
)
from vlprompt.methods.dcp_ground import DCPGround, DCPGroundOptions
from vlprompt.methods.grounding import GroundingMethod, GroundingOptions, normalized_targets, rec_loss
from vlprompt.methods.l2p_ground import L2PGround, L2PGroundOptions
from vlprompt.methods.lpi import layer_alignment_loss, prompt_task_loss
from vlprompt.methods.lpi_ground import LPIGround, LPIGroundOptions
from vlprompt.methods.maple_ground import MaPLeGround, MaPLeGroundOptions
from vlprompt.methods.sprompts_ground import SPromptsGround, SPromptsGroundOptions

from .ground_helpers import EXPRESSIONS, TARGETS, images, rec_only, tiny

T = [0.5, 0.5, 0.2, 0.2]  # cxcywh; corners (0.4, 0.4, 0.6, 0.6)
SIZES = torch.tensor([[64, 64], [64, 64]])


def _lpi(num_tasks: int = 2, **kw) -> LPIGround:
    torch.manual_seed(3)
    kw = {"depth": 3, "layers": 3, "n_tokens": 2, **kw}
    return LPIGround(tiny(), LPIGroundOptions(num_tasks=num_tasks, **kw))


def _heads_trainable(method: GroundingMethod) -> list[bool]:
    return [p.requires_grad for h in method.detector.heads() for p in h.parameters()]


# ---- DETR's match and loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weights", "patch"),
    [((1.0, 5.0, 2.0), 1), ((1.0, 0.0, 0.0), 0), ((0.0, 1.0, 0.0), 1), ((0.0, 0.0, 1.0), 2)],
)
def test_the_match_follows_each_matching_weight(weights, patch):
    """Patch 0 scores highest but lies far away, patch 1 has the least L1 (0.12), patch 2 the best GIoU (0.39 vs
    0.22): DETR's default costs pick patch 1, and each cost alone picks its own best patch (margins >= 0.1)."""
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.56, 0.56, 0.2, 0.2], [0.5, 0.5, 0.32, 0.32]]])
    logits = torch.tensor([[3.0, 0.0, 0.0]])
    c, l1, g = weights
    options = GroundingOptions(match_class=c, match_l1=l1, match_giou=g)
    assert rec_loss(logits, boxes, torch.tensor([T]), options)[2].tolist() == [patch]
    if weights == (1.0, 5.0, 2.0):
        assert rec_loss(logits, boxes, torch.tensor([T]))[2].tolist() == [patch]


def test_the_giou_term_compares_each_expression_with_its_own_target():
    # row 0 hits its target exactly; row 1 is its target shifted by 0.05 in x (IoU 0.6, hull = union: GIoU 0.6).
    # Against the other row's target both would be far off (GIoU -0.68).
    targets = torch.tensor([T, [0.25, 0.2, 0.2, 0.2]])
    boxes = torch.tensor([[T], [[0.2, 0.2, 0.2, 0.2]]])
    _, terms, matched = rec_loss(torch.zeros(2, 1), boxes, targets)
    assert matched.tolist() == [0, 0]
    assert terms["giou"].item() == pytest.approx((0.0 + (1 - 0.6)) / 2, abs=1e-5)
    assert terms["l1"].item() == pytest.approx((0.0 + 0.05) / 2, abs=1e-6)


def test_training_uses_the_methods_loss_options():
    options = {"class_weight": 0.5, "l1_weight": 3.0, "giou_weight": 7.0, "match_class": 0.0, "match_giou": 0.0}
    imgs = images()
    base = GroundingMethod(tiny(), GroundingOptions(**options))
    torch.manual_seed(3)
    l2p = L2PGround(tiny(), L2PGroundOptions(pull_weight=0.0, **options)).eval()
    for m in (base, l2p):
        tokens = m.tokenize(EXPRESSIONS)
        with torch.no_grad():
            loss = m(imgs, tokens, TARGETS)
            out = m.ground(imgs, tokens)
            want = rec_loss(out.logits[..., 0], out.boxes, TARGETS, m.options)[0]
            detr = rec_loss(out.logits[..., 0], out.boxes, TARGETS)[0]
        torch.testing.assert_close(loss, want)
        assert abs(float(want) - float(detr)) > 1e-2  # the options matter on these data


def test_inputs_of_another_dtype_give_results_in_the_models_dtype():
    """float64 targets and sizes (numpy's default) leave the loss, targets and boxes float32, and their values."""
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    norm = normalized_targets(boxes, torch.tensor([[100, 200]], dtype=torch.float64))
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, torch.tensor([[0.3, 0.2, 0.4, 0.2]]))
    imgs = images()
    base = GroundingMethod(tiny())
    torch.manual_seed(3)
    l2p = L2PGround(tiny(), L2PGroundOptions()).eval()
    for m in (base, l2p):
        tokens = m.tokenize(EXPRESSIONS)
        with torch.no_grad():
            loss = m(imgs, tokens, TARGETS.double())
            want = m(imgs, tokens, TARGETS)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, want)
    pred = base.predict(imgs, EXPRESSIONS, SIZES.double(), k=3)
    assert pred.boxes.dtype == torch.float32
    torch.testing.assert_close(pred.boxes, base.predict(imgs, EXPRESSIONS, SIZES.float(), k=3).boxes)


# ---- predict -------------------------------------------------------------------------------------------------------
def test_predict_takes_exactly_one_expression_per_image():
    m = GroundingMethod(tiny())
    tokens = m.tokenize(["a", "b", "c"])
    with pytest.raises(ValueError, match="one expression per image"):
        m.predict(images(), tokens, SIZES)  # 2-D, but three expressions for two images
    with pytest.raises(ValueError, match="one expression per image"):
        m.predict(images(), tokens[:2, None], SIZES)  # one row per image, but [B, 1, L]


def _predicts_as_ground_with(m, imgs, tokens, plans, effect: float):
    """``predict(plans=...)`` scores are ground()'s with those plans, sorted; the plans change the logits."""
    pred = m.predict(imgs, tokens, SIZES, k=3, plans=plans)
    with torch.no_grad():
        want = m.ground(imgs, tokens, plans).logits[..., 0]
        without = m.ground(imgs, tokens).logits[..., 0]
    torch.testing.assert_close(pred.scores, want.sort(dim=-1, descending=True, stable=True).values[:, :3])
    assert (want - without).abs().max() > effect
    return pred


def test_predict_answers_with_the_plans_it_is_given():
    m = GroundingMethod(tiny())
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)
    torch.manual_seed(4)
    plans = Plans(image=PromptPlan(insert=torch.randn(2, m.backbone.vision_width)))
    _predicts_as_ground_with(m, imgs, tokens, plans, effect=1e-3)


def test_clipping_bounds_x_by_the_width_and_y_by_the_height():
    m = GroundingMethod(tiny(), GroundingOptions(clip_boxes=True))
    sizes = torch.tensor([[50, 40], [30, 20]])  # wider than high: x in (h, w] must survive
    clipped = m.predict(images(), EXPRESSIONS, sizes, k=64).boxes
    raw = GroundingMethod(m.backbone, detector=m.detector).predict(images(), EXPRESSIONS, sizes, k=64).boxes
    w, h = sizes[:, 0].float().view(-1, 1, 1), sizes[:, 1].float().view(-1, 1, 1)
    want = raw.clone()
    want[..., 0::2] = torch.minimum(torch.maximum(raw[..., 0::2], torch.zeros(())), w)
    want[..., 1::2] = torch.minimum(torch.maximum(raw[..., 1::2], torch.zeros(())), h)
    torch.testing.assert_close(clipped, want)
    x = raw[..., 0::2]
    assert bool(((x > h + 1) & (x < w - 1)).any())  # boxes between the height and the width stay put in x


# ---- constructors --------------------------------------------------------------------------------------------------
def test_base_constructor_defaults_and_options():
    m = GroundingMethod(tiny())
    assert m.loss_terms == {}  # nothing logged before the first step
    assert m.detector.objectness_head is None
    owlv2 = GroundingMethod(tiny(), GroundingOptions(objectness=True))
    assert owlv2.detector.objectness_head is not None
    assert not any(p.requires_grad for p in owlv2.detector.objectness_head.parameters())  # a head: frozen
    detector = Detector(tiny())
    ready = GroundingMethod.from_detector(detector, GroundingOptions(top_k=3), train_heads=True)
    assert ready.detector is detector and ready.options.top_k == 3
    assert all(_heads_trainable(ready))
    # a task-prompt method relying on the base constructor keeps the heads frozen
    base = TaskGroundingMethod(tiny(), TaskGroundingOptions(num_tasks=1))
    assert not any(_heads_trainable(base))


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (LPIGround, LPIGroundOptions(num_tasks=2, depth=2, layers=2, n_tokens=2)),
        (SPromptsGround, SPromptsGroundOptions(num_tasks=2, n_tokens=2)),
        (MaPLeGround, MaPLeGroundOptions(num_tasks=2, depth=2, n_tokens=2)),
        (DCPGround, DCPGroundOptions(num_tasks=2, n_tokens=2, interact_depth=2)),
        (L2PGround, L2PGroundOptions(num_tasks=2)),
    ],
)
def test_prompt_methods_keep_a_given_detector_and_honour_train_heads(cls, options):
    detector = Detector(tiny())
    m = cls.from_detector(detector, options, train_heads=True)
    assert m.detector is detector
    assert all(_heads_trainable(m))
    frozen = cls.from_detector(Detector(tiny()), options)
    assert not any(_heads_trainable(frozen))


def test_options_reach_the_interaction_router_and_prompt_inits():
    m = _lpi(interact_mix=0.3, n_keys=3, init_std=0.05)
    assert [i.mix for i in m.interactions] == [0.3, 0.3]
    assert m.image_router.keys.shape[1] == 3
    assert max(float(p.detach().std()) for p in m.prompts[0].parameters()) < 0.1  # LPI's 0.5 otherwise
    torch.manual_seed(3)
    dcp = DCPGround(tiny(), DCPGroundOptions(num_tasks=2, interact_depth=2, interact_mix=0.25))
    assert [i.mix for i in dcp.interactions] == [0.25, 0.25]
    torch.manual_seed(3)
    wide = SPromptsGround(tiny(), SPromptsGroundOptions(num_tasks=1, init_std=0.5))
    assert 0.4 < float(wide.prompts[0].vision.detach().std()) < 0.6  # S-Prompts' 0.02 otherwise


def test_l2p_pool_options():
    m = L2PGround(tiny(), L2PGroundOptions()).eval()
    imgs = images(3)
    selection = m.select(imgs)
    assert m.pool.top_k == 4 and selection.indices.shape == (3, 4)  # 4 prompts of 4 tokens per image
    assert m.pool_plans(selection).image.insert.shape == (3, 16, m.backbone.vision_width)
    full = L2PGround(tiny(), L2PGroundOptions(pool_size=4, pool_top_k=4))  # every prompt may be chosen
    assert full.select(imgs).indices.shape == (3, 4)
    zero = L2PGround(tiny(), L2PGroundOptions(init="zero"))
    assert not zero.pool.prompts.detach().any() and not zero.pool.keys.detach().any()


# ---- where prompts enter, the interaction ------------------------------------------------------------------------
def test_grounding_plans_insert_before_ln_pre_and_add_by_default():
    torch.manual_seed(0)
    pv, pt = torch.randn(3, 2, 8), torch.randn(3, 2, 4)
    plans = grounding_plans(pv, pt, 3)
    assert plans.image.insert_before_ln_pre
    assert sorted(plans.image.add) == [1, 2] and sorted(plans.text.add) == [1, 2]
    assert not plans.image.replace and not plans.text.replace


def test_the_interaction_couples_from_depth_two():
    m = _lpi(depth=2, layers=2)
    between = m.interaction(0)
    assert between is not None
    n, b = m.options.n_tokens, m.backbone
    torch.manual_seed(0)
    xv, xt = torch.randn(2, 1 + n + 3, b.vision_width), torch.randn(2, 1 + n + 3, b.text_width)
    v1, t1 = between(1, xv, xt)
    assert (v1[:, 1 : 1 + n] - xv[:, 1 : 1 + n]).abs().max() > 1e-3
    assert (t1[:, 1 : 1 + n] - xt[:, 1 : 1 + n]).abs().max() > 1e-3
    v2, t2 = between(2, xv, xt)
    assert v2 is xv and t2 is xt  # blocks from depth on run alone
    assert prompt_interaction(m.interactions[0], n, 1) is None
    torch.manual_seed(3)
    dcp = DCPGround(tiny(), DCPGroundOptions(num_tasks=1, n_tokens=2, interact_depth=2))
    assert dcp.interaction(0) is not None


@pytest.mark.parametrize("name", ["lpi_ground", "dcp_ground"])
def test_the_interaction_runs_on_a_reduced_precision_backbone(name):
    """bf16 towers (``backbone.precision: bf16``) with the float32 interaction: trains and answers, in float32."""
    torch.manual_seed(0)
    bb = vlprompt.load_backbone("vlprompt-tiny", pretrained=None, precision="bf16").eval()
    torch.manual_seed(3)
    if name == "lpi_ground":
        m = LPIGround(bb, LPIGroundOptions(num_tasks=1, depth=3, layers=3, n_tokens=2))
    else:
        m = DCPGround(bb, DCPGroundOptions(num_tasks=1, n_tokens=2, interact_depth=3))
    assert m.interactions[0].ln_v.weight.dtype == torch.float32
    loss = m(images(), m.tokenize(EXPRESSIONS), TARGETS)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert m.interactions[0].ln_v.weight.grad.abs().sum() > 0


# ---- LPI's task term ---------------------------------------------------------------------------------------------
def test_lpi_task_term_from_the_second_task_with_its_options():
    m = _lpi(double_sigmoid=True)
    m.begin_task(1)
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)
    with torch.no_grad():
        loss = m(imgs, tokens, TARGETS)
        pv, pt = m.prompts[1]()
        align = layer_alignment_loss(pv, pt, 0.01, True)
        task = prompt_task_loss(m.prompts, 1, pv, pt, m.task_relation, 0.01, True)
        single = prompt_task_loss(m.prompts, 1, pv, pt, m.task_relation, 0.01, False)
        rec = rec_only(m, imgs, tokens)
    assert "task" in m.loss_terms and m.loss_terms["task"] == pytest.approx(float(task), rel=1e-5)
    torch.testing.assert_close(loss, rec + 0.1 * align + 0.1 * task)
    assert abs(float(task) - float(single)) > 1e-2  # double_sigmoid changes the term on these prompts


# ---- evaluation ----------------------------------------------------------------------------------------------------
def test_evaluation_answers_every_row_with_its_routed_tasks_prompts():
    """Rows routed to an earlier task than the current one use that task's prompts and interaction, and every field
    of the detector output goes back to its row."""
    m = _lpi()
    imgs, tokens = images(4, seed=5), m.tokenize(["a", "b", "c", "d"])
    feats = m.frozen_image_features(imgs)
    m.begin_task(1)
    m.fit_keys(0, feats[:2].repeat(3, 1))
    m.fit_keys(1, feats[2:].repeat(3, 1))
    out, tasks = m.ground_eval(imgs, tokens)
    assert tasks.tolist() == [0, 0, 1, 1]
    for t, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        with torch.no_grad():
            alone = m.ground(imgs[rows], tokens[rows], m.task_plans(t), m.interaction(t))
        for field in ("logits", "boxes", "features", "queries"):
            torch.testing.assert_close(getattr(out, field)[rows], getattr(alone, field), msg=f"{field} of task {t}")
    with torch.no_grad():
        current = m.ground(imgs[:2], tokens[:2])  # task 1's prompts and interaction
    assert (current.logits - out.logits[:2]).abs().max() > 1e-4


def test_a_task_method_predicts_with_the_plans_it_is_given():
    """Given plans (another task's) answer exactly as ground() with them, towers apart, without routing."""
    m = _lpi()
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)
    plans = m.task_plans(1)  # the current task is 0
    assert _predicts_as_ground_with(m, imgs, tokens, plans, effect=1e-4).tasks is None


def test_l2p_ground_passes_a_coupling_on_with_its_pool_prompts():
    """L2P's ground with a ``between`` runs the towers in lock-step with the pool's vision prompts."""
    torch.manual_seed(3)
    m = L2PGround(tiny(), L2PGroundOptions()).eval()
    imgs, tokens = images(), m.tokenize(EXPRESSIONS)

    def halve_text(layer, xv, xt):
        return (xv, 0.5 * xt) if layer == 1 else (xv, xt)

    with torch.no_grad():
        out = m.ground(imgs, tokens, between=halve_text)
        image_plan = m.pool_plans(m.select(imgs)).image
        want = m.detector.forward_paired(imgs, tokens, image_plan, None, halve_text)
        unprompted = m.detector.forward_paired(imgs, tokens, None, None, halve_text)
        apart = m.ground(imgs, tokens)
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.boxes, want.boxes)
    assert (out.logits - unprompted.logits).abs().max() > 1e-4
    assert (out.logits - apart.logits).abs().max() > 1e-4
