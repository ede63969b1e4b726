"""Invariants of the baselines that a one-line change would break (issue 14, mutation testing): L2P's per-sample
key-query selection (which query, which prompts, top-k, the batch-wise vote only in training), its loss (CLIP loss
+ 0.1 · key pull on both pools) and its encoders (explicit plans win, tokens or strings, max_words); MaPLe's depth
and context init; VPT's init range; S-Prompts' / SeqFT's init std and ln_pre entry; the fine-tuned temperature's
cap; and the method factory (option names, RVLR's nested method section validated at config time, error keys)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method, option_names
from vlprompt.methods.base import Plans
from vlprompt.methods.build import method_options

from .golden import build_backbone

CAPTIONS = ["a red square", "a picture of a blue circle"]
POOL = {"name": "l2p", "pool_size": 4, "length": 2, "top_k": 2}
PER_SAMPLE = [[0, 1], [2, 3]]  # what the constructed keys select for sample 0 and sample 1
MAJORITY = [[0, 1], [0, 1]]  # L2P's batch-wise vote over PER_SAMPLE: four single votes, ties to the lower index


@pytest.fixture(scope="module")
def tiny() -> vlprompt.Backbone:
    """Read-only tiny backbone (every method freezes it again; nothing here trains it)."""
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _images(bb: vlprompt.Backbone) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, bb.image_size, bb.image_size)


def _keys_for(queries: torch.Tensor) -> torch.Tensor:
    """Four keys for two unit queries with clear margins: sample 0 ranks keys 0 > 1 > {2, 3}, sample 1 ranks
    2 > 3 > {0, 1} (each query's own component orthogonal to the other query, plus a damped off-plane copy)."""
    q0, q1 = queries
    c = q0 @ q1
    e0, e1 = F.normalize(q0 - c * q1, dim=0), F.normalize(q1 - c * q0, dim=0)
    basis = torch.linalg.qr(torch.stack([q0, q1, torch.randn_like(q0), torch.randn_like(q0)], 1)).Q
    r0, r1 = basis[:, 2], basis[:, 3]  # orthogonal to both queries
    keys = torch.stack([e0, F.normalize(e0 + 0.5 * r0, dim=0), e1, F.normalize(e1 + 0.5 * r1, dim=0)])
    cos = queries @ keys.T
    top, second = cos.gather(1, torch.tensor(PER_SAMPLE)).unbind(1)
    others = cos.gather(1, torch.tensor([[2, 3], [0, 1]])).abs().amax(1)
    assert ((top - second).min() > 1e-3) and ((second - others).min() > 1e-3), cos  # no near-ties decide
    return keys


def _l2p(bb: vlprompt.Backbone, **options):
    """An L2P on ``bb`` whose image (and text) pool keys are built so that PER_SAMPLE is the per-sample choice."""
    torch.manual_seed(2)
    method = build_method({**POOL, **options}, bb)
    images, tokens = _images(bb), method.tokenize(CAPTIONS)
    with torch.no_grad():
        method.pool.keys.copy_(_keys_for(F.normalize(bb.encode_image(images), dim=-1)))
        if method.text_pool is not None:
            method.text_pool.keys.copy_(_keys_for(F.normalize(bb.encode_text(tokens), dim=-1)))
    return method, images, tokens


def _chosen(pool, indices) -> torch.Tensor:
    """Each sample's chosen prompts concatenated along the tokens, in the order chosen: ``[B, k·length, W]``."""
    return torch.stack([torch.cat([pool.prompts[i, 0] for i in row]) for row in indices])


def _pull(pool, queries: torch.Tensor, indices) -> torch.Tensor:
    """L2P's surrogate: batch mean of Σ_k (1 - cos(query, chosen key))."""
    keys = F.normalize(pool.keys, dim=-1)[torch.tensor(indices)]  # [B, k, E]
    return (1 - (keys * F.normalize(queries, dim=-1)[:, None]).sum(-1)).sum(1).mean()


def _l2p_reference(method, images, tokens, image_idx, text_idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, image features, text features)`` computed from the definition, the selections given."""
    bb = method.backbone
    q_img = F.normalize(bb.encode_image(images), dim=-1)
    vis = F.normalize(bb.encode_image(images, PromptPlan(insert=_chosen(method.pool, image_idx))), dim=-1)
    pull = _pull(method.pool, q_img, image_idx)
    if method.text_pool is None:
        txt = F.normalize(bb.encode_text(tokens), dim=-1)
    else:
        q_txt = F.normalize(bb.encode_text(tokens), dim=-1)
        txt = F.normalize(bb.encode_text(tokens, PromptPlan(insert=_chosen(method.text_pool, text_idx))), dim=-1)
        pull = pull + _pull(method.text_pool, q_txt, text_idx)
    return ClipLoss()(vis, txt, bb.logit_scale) + 0.1 * pull, vis, txt


# ---- L2P ----------------------------------------------------------------------------------------------------
def test_l2p_defaults_are_l2ps_setting():
    from vlprompt.methods.l2p import L2POptions

    o = L2POptions()
    assert (o.pool_size, o.length, o.top_k, o.pull_weight, o.init) == (10, 5, 5, 0.1, "uniform")
    assert not o.batchwise_train and not o.text_pool


@pytest.mark.parametrize("text_pool", [False, True])
def test_l2p_loss_is_clip_loss_under_each_samples_top_k_prompts_plus_the_weighted_key_pull(tiny, text_pool):
    """Training (per-sample selection unless ``batchwise_train``): each image's frozen feature picks its top-k keys
    by cosine, their prompts (in rank order) enter after CLS; with ``text_pool`` the frozen text feature does the
    same on the text side; loss = CLIP loss + 0.1 · (image pull + text pull)."""
    method, images, tokens = _l2p(tiny, text_pool=text_pool)
    method.train()
    with torch.no_grad():
        loss = method(images, tokens)
        want, vis, txt = _l2p_reference(method, images, tokens, PER_SAMPLE, PER_SAMPLE)
        frozen_vis = F.normalize(tiny.encode_image(images), dim=-1)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert (vis - frozen_vis).abs().max() > 1e-3  # the prompts do change the features


def test_l2p_batchwise_vote_serves_every_sample_in_training_only(tiny):
    """``batchwise_train``: in training the k prompts chosen most often in the batch serve every sample (both
    pools); in evaluation each sample keeps its own top-k (its features must not depend on its batch)."""
    method, images, tokens = _l2p(tiny, text_pool=True, batchwise_train=True)
    with torch.no_grad():
        method.train()
        want = _l2p_reference(method, images, tokens, MAJORITY, MAJORITY)[0]
        torch.testing.assert_close(method(images, tokens), want, atol=1e-5, rtol=1e-5)
        method.eval()
        want, vis, txt = _l2p_reference(method, images, tokens, PER_SAMPLE, PER_SAMPLE)
        torch.testing.assert_close(method(images, tokens), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.encode_image(images), vis, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.encode_text(tokens), txt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_pool", [False, True])
def test_l2p_encoders_select_per_sample_prompts_unless_given_plans(tiny, text_pool):
    """``encode_image`` / ``encode_text`` (strings or token ids) use the pool's per-sample choice (the text pool
    only when there is one, else the frozen text tower); explicit plans of a tower are used as given."""
    method, images, tokens = _l2p(tiny, text_pool=text_pool)
    method.eval()
    torch.manual_seed(5)
    image_plan = PromptPlan(insert=torch.randn(3, tiny.vision_width))
    text_plan = PromptPlan(replace={0: torch.randn(2, tiny.text_width)})
    with torch.no_grad():
        _, vis, txt = _l2p_reference(method, images, tokens, PER_SAMPLE, PER_SAMPLE)
        torch.testing.assert_close(method.encode_image(images), vis, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.encode_image(images, Plans()), vis, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.encode_text(CAPTIONS), txt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.encode_text(tokens), txt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.encode_text(tokens, Plans()), txt, atol=1e-5, rtol=1e-5)
        given_vis = F.normalize(tiny.encode_image(images, image_plan), dim=-1)
        given_txt = F.normalize(tiny.encode_text(tokens, text_plan), dim=-1)
        torch.testing.assert_close(method.encode_image(images, Plans(image=image_plan)), given_vis)
        torch.testing.assert_close(method.encode_text(tokens, Plans(text=text_plan)), given_txt)
        torch.testing.assert_close(method.encode_text(CAPTIONS, Plans(text=text_plan)), given_txt)
        assert (given_vis - vis).abs().max() > 1e-3 and (given_txt - txt).abs().max() > 1e-3


@pytest.mark.parametrize("text_pool", [False, True])
def test_l2p_text_encoder_cuts_captions_at_max_words(tiny, text_pool):
    method, _, _ = _l2p(tiny, text_pool=text_pool)
    method.eval()
    method.max_words = 5
    caption = ["a picture of a small blue circle left of a big red square"]
    with torch.no_grad():
        cut = method.encode_text(caption)
        torch.testing.assert_close(cut, method.encode_text(method.tokenize(caption)))
        method.max_words = 0
        assert (method.encode_text(caption) - cut).abs().max() > 1e-3


def test_l2p_pools_take_top_k_and_init_from_the_options(tiny):
    method = build_method({**POOL, "top_k": 3, "text_pool": True, "init": "zero"}, tiny)
    for pool, width in ((method.pool, tiny.vision_width), (method.text_pool, tiny.text_width)):
        assert pool.top_k == 3
        assert pool.prompts.shape == (4, 1, 2, width) and pool.keys.shape == (4, tiny.embed_dim)
        assert not pool.prompts.any() and not pool.keys.any()  # prompts and keys both from `init`
    uniform = build_method({**POOL, "text_pool": True}, tiny)  # L2P's U(-1, 1), prompts and keys
    for pool in (uniform.pool, uniform.text_pool):
        for t in (pool.prompts, pool.keys):
            assert t.abs().max() <= 1 and t.abs().max() > 0.9


# ---- MaPLe, VPT, S-Prompts, SeqFT, fine-tuning ---------------------------------------------------------------
def _micro(vision_layers: int = 2, text_layers: int = 2, **text_cfg) -> vlprompt.Backbone:
    """A random micro CLIP with the given tower depths (and text options)."""
    torch.manual_seed(0)
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": text_layers, **text_cfg}
    vision = {"image_size": 32, "layers": vision_layers, "width": 64, "head_width": 32, "patch_size": 16}
    return build_backbone({"embed_dim": 32, "vision_cfg": vision, "text_cfg": text})


@pytest.mark.parametrize(("vision_layers", "text_layers"), [(3, 2), (2, 3)])
def test_maple_depth_is_capped_by_the_shallower_tower(vision_layers, text_layers):
    bb = _micro(vision_layers, text_layers)
    method = build_method({"name": "maple", "n_ctx": 2, "depth": 9}, bb)
    assert method.prompts.depth == 2
    plans = method.plans()
    assert sorted(plans.text.replace) == [0, 1] and sorted(plans.image.replace) == [1]


def test_maple_context_starts_from_the_init_words_behind_n_ctx_placeholders(tiny):
    from vlprompt.methods.maple import MaPLeOptions

    assert MaPLeOptions().ctx_init == "a photo of a"
    method = build_method({"name": "maple", "n_ctx": 2, "depth": 2}, tiny)
    torch.testing.assert_close(method.prompts.ctx.ctx.detach(), method.word_embeddings("a photo of a", 2))
    assert method.n_placeholders == 2
    assert torch.equal(method.tokenize(["a red square"]), tiny.tokenize(["X X a red square"]))


@pytest.mark.parametrize("name", ["coop", "maple"])
def test_context_without_init_words_is_random_on_a_last_token_pooled_tower(name):
    """``ctx_init=""`` means CoOp's random N(0, 0.02²) context on every text tower, also where the pooled token is
    the last position (there ``word_embeddings("", n)`` is not None: it would read end-of-text and padding)."""
    bb = _micro(pool_type="last")
    method = build_method({"name": name, "n_ctx": 3, "ctx_init": ""}, bb)
    ctx = (method.context if name == "coop" else method.prompts.ctx).ctx.detach()
    empty = bb.text.token_embedding(bb.tokenize([""])[0, 1:4]).float()
    assert not torch.allclose(ctx, empty) and (ctx[1] - ctx[2]).abs().max() > 1e-3
    assert abs(ctx.std().item() - 0.02) < 0.005


def test_vpt_prompts_are_uniform_in_vpts_xavier_range(tiny):
    """VPT's init: U(-r, r) with r = sqrt(6 / (3·patch² + D)) (Xavier on the patch embedding)."""
    patch = tiny.vision.visual.patch_size[0]
    r = math.sqrt(6 / (3 * patch * patch + tiny.vision_width))
    torch.manual_seed(0)
    tokens = build_method({"name": "vpt", "n_tokens": 8}, tiny).prompts.tokens
    assert tokens.abs().max() <= r and tokens.abs().max() > 0.98 * r
    assert abs(tokens.std().item() - r / math.sqrt(3)) < 0.05 * r


@pytest.mark.parametrize("name", ["sprompts", "seqft"])
def test_sprompts_and_seqft_prompts_start_at_init_std(tiny, name):
    for std in (0.02, 0.5):
        torch.manual_seed(0)
        options = {"name": name, "num_tasks": 2, "n_tokens": 4}
        method = build_method(options if std == 0.02 else {**options, "init_std": std}, tiny)
        prompts = list(method.prompts) if name == "sprompts" else [method.prompt]
        for p in prompts:
            for t in (p.vision, p.text):
                assert abs(t.std().item() - std) < 0.1 * std, (name, std, t.std())


def test_seqft_vision_prompts_enter_before_ln_pre_unless_told(tiny):
    assert build_method({"name": "seqft", "n_tokens": 2}, tiny).plans().image.insert_before_ln_pre is True
    after = build_method({"name": "seqft", "n_tokens": 2, "insert_before_ln_pre": False}, tiny).plans().image
    assert after.insert_before_ln_pre is False


def test_finetune_logit_scale_is_capped_at_100():
    """open_clip's recipe clamps the learned temperature at 100."""
    torch.manual_seed(0)
    bb = vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()
    method = build_method({"name": "finetune"}, bb)
    with torch.no_grad():
        bb.model.logit_scale.fill_(math.log(150.0))
        assert method.logit_scale.item() == pytest.approx(100.0)
        bb.model.logit_scale.fill_(math.log(50.0))
        assert method.logit_scale.item() == pytest.approx(50.0)


# ---- the method factory ---------------------------------------------------------------------------------------
def test_option_names_of_a_method_and_of_an_unknown_name():
    assert option_names("coop") == {"n_ctx", "ctx_init"}
    assert "num_tasks" in option_names("l2p")
    assert option_names("no-such-method") == set() and option_names("") == set()


def test_rvlr_base_section_defaults_to_finetune_and_is_validated_with_the_config():
    """A nested method section (RVLR's ``base``) has its default and is checked when the config is read (not only
    when the model is built); errors name the key as written in the config."""
    _, options = method_options({"name": "rvlr"})
    assert options.base == {"name": "finetune"}
    _, options = method_options({"name": "rvlr", "base": {"name": "coop", "n_ctx": 2}})
    assert options.base == {"name": "coop", "n_ctx": 2}
    with pytest.raises(ConfigError, match=r"^method\.n_ctx = 0"):
        method_options({"name": "coop", "n_ctx": 0})
    with pytest.raises(ConfigError, match=r"^method\.base\.n_ctx = 0"):
        method_options({"name": "rvlr", "base": {"name": "coop", "n_ctx": 0}})
