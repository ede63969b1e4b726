"""RLCF invariants that a one-line change would break (issue 14, mutation testing): which reward models and
weights are used, the baseline, the REINFORCE loss's precision, K, which candidates are scored, the reward
features (renormalisation, unit rows, which text encoder, the reward text of the classes), and retrieval's query
(which tower encodes it, the tuned embedding rows, its end-of-text cut, the loss and the start-point ranking)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbone import load_backbone
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.rlcf import (
    RewardCLIP,
    RewardEncoder,
    RewardOptions,
    baseline_rewards,
    reinforce_loss,
    reward_specs,
    reward_weights,
)
from vlprompt.methods.tpt import Episode

TEXTS = ["a red star", "a small dotted red crescent right of a small orange digit 3", "a blue circle"]


class IndexScore:
    """A stand-in reward: candidate ``c`` scores ``c`` (so rewards depend on which candidates were chosen)."""

    def score(self, query, candidates, index: torch.Tensor) -> torch.Tensor:
        return index.float()


class Recorder(nn.Module):
    """A stand-in reward CLIP that records the images it is given (features: the per-channel means)."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.visual = nn.Module()
        self.visual.output_dim = 3
        self.seen: list[torch.Tensor] = []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x.mean(dim=(2, 3))


class TextSpy:
    """A stand-in reward that records the texts it encodes."""

    def __init__(self) -> None:
        self.texts: list[list[str]] = []

    def text_features(self, texts) -> list[torch.Tensor]:
        self.texts.append(list(texts))
        return [torch.zeros(len(texts), 4)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


def _fresh(precision: str = "fp32"):
    """A backbone of its own (retrieval methods change which parameters require grad)."""
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None, precision=precision)


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ---- reward models, weights, baseline, loss ----------------------------------------------------------------


def test_reward_specs_pair_models_with_their_pretrained_tags():
    spec = lambda models, tags: reward_specs(RewardOptions(reward=models, reward_pretrained=tags))  # noqa: E731
    assert spec(["a", "b"], ["world"]) == [("a", "world"), ("b", "world")]  # one tag serves every model
    assert spec(["a", "b"], []) == [("a", None), ("b", None)]
    assert spec(["a", "b", "c", "d"], ["x", "none", "", "null"]) == [("a", "x"), ("b", None), ("c", None), ("d", None)]
    assert spec(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    with pytest.raises(ConfigError, match="2 reward_pretrained tags for 3 reward models"):
        spec(["a", "b", "c"], ["x", "y"])


def test_reward_weights_round_to_two_decimals_and_one_model_weighs_one():
    assert reward_weights([], 3) == [0.33, 0.33, 0.33]
    assert reward_weights([5.0], 1) == [1.0]
    assert baseline_rewards(torch.tensor([[1.0, 3.0]])).tolist() == [[-1.0, 1.0]]  # K = 2 is centred too


def test_reinforce_loss_runs_low_precision_logits_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g) * 4
    candidates, rewards = logits.topk(3, dim=-1).indices, torch.rand(3, 3, generator=g)
    low = reinforce_loss(logits.to(torch.bfloat16), candidates, rewards)
    want = reinforce_loss(logits.to(torch.bfloat16).float(), candidates, rewards)
    assert low.dtype == torch.float32 and float(low) == pytest.approx(float(want), abs=1e-6)


# ---- reward features -----------------------------------------------------------------------------------------
def test_reward_encoder_reports_the_width_of_its_image_features(tiny):
    """The retrieval runner splits the models' concatenated image features by ``embed_dim``."""
    enc = RewardEncoder.from_backbone(tiny)
    with torch.no_grad():
        feats = enc.encode_image(_images(1, tiny.image_size))
    assert enc.embed_dim == feats.shape[-1] == tiny.embed_dim


@pytest.mark.parametrize(
    ("policy_mean", "policy_std"),
    [((0.4, 0.45, 0.6), (0.25, 0.25, 0.25)), ((0.5, 0.5, 0.5), (0.2, 0.3, 0.4))],
    ids=["mean-differs", "std-differs"],
)
def test_reward_images_are_renormalised_when_either_statistic_differs(policy_mean, policy_std):
    model = Recorder()
    reward = RewardCLIP([RewardEncoder(model, None, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    col = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    reward.image_features((pixels - col(policy_mean)) / col(policy_std), policy_mean, policy_std)
    assert model.seen[0].shape == (2, 3, 32, 32)  # same size: no resize
    torch.testing.assert_close(model.seen[0], (pixels - 0.5) / 0.25, atol=1e-5, rtol=1e-5)


def test_reward_features_are_unit_rows_of_each_models_output(tiny):
    """Each image's and each text's own L2 norm (not the batch's, not across the batch)."""
    reward = RewardCLIP([tiny])
    images = _images(3, tiny.image_size)
    with torch.no_grad():
        raw_images = tiny.model.encode_image(images)
        raw_texts = tiny.model.encode_text(tiny.tokenizer(TEXTS))
    got = reward.image_features(images, tiny.image_mean, tiny.image_std)[0]
    torch.testing.assert_close(got, F.normalize(raw_images, dim=-1), atol=1e-5, rtol=1e-5)
    got = reward.text_features(TEXTS)[0]
    torch.testing.assert_close(got, F.normalize(raw_texts, dim=-1), atol=1e-5, rtol=1e-5)


def test_reward_without_a_promptable_tower_uses_open_clips_encode_text(tiny):
    """``load_reward`` builds encoders without the backbone's text tower (RN50x64 has none)."""
    enc = RewardEncoder(tiny.model, tiny.tokenizer, tiny.image_size, tiny.image_mean, tiny.image_std)
    assert enc.text_tower is None
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_text(TEXTS), tiny.model.encode_text(tiny.tokenizer(TEXTS)))


def test_a_reduced_precision_reward_takes_the_policys_float32_images():
    """backbone.precision bf16 loads the rewards in bf16 too: their image tower gets the images in its dtype."""
    images = _images(2, 64)
    feats = []
    for precision in ("fp32", "bf16"):
        b = _fresh(precision)
        enc = RewardEncoder(b.model, b.tokenizer, b.image_size, b.image_mean, b.image_std)  # as load_reward
        feats.append(RewardCLIP([enc]).image_features(images, b.image_mean, b.image_std)[0])
    assert feats[1].dtype == torch.float32
    assert (feats[0] * feats[1]).sum(-1).min() > 0.99  # the same weights, rounded to bf16


# ---- objectives, classification ---------------------------------------------------------------------------
def test_objectives_score_the_top_k_candidates_of_each_row(tiny):
    torch.manual_seed(1)
    rlcf = build_method({"name": "rlcf", "sample_k": 3}, tiny)
    rlcf.attach_reward(IndexScore())
    rlcf.reward_text = None
    logits = torch.randn(2, 5)  # 2 selected views, 5 classes: K = 3 < 5 classes, though more than 2 views
    got = rlcf.objective(Episode(torch.zeros(2, 3, 4, 4), extra={"reward_image": None}), logits)
    top = logits.topk(3, dim=-1).indices
    assert float(got) == pytest.approx(float(reinforce_loss(logits, top, baseline_rewards(top.float()))))
    assert rlcf.reward_specs() == reward_specs(rlcf.options)
    retrieval = build_method({"name": "rlcf_retrieval", "sample_k": 3}, tiny)
    retrieval.attach_reward(IndexScore())
    one = torch.randn(1, 6)  # one query row, 6 candidates
    got = retrieval.objective(Episode(torch.zeros(1), extra={"reward_query": None}), one)
    top = one.topk(3, dim=-1).indices
    assert float(got) == pytest.approx(float(reinforce_loss(one, top, baseline_rewards(top.float()))))
    assert retrieval.reward_specs() == reward_specs(retrieval.options)


def test_one_candidate_is_allowed_and_classes_need_a_reward_first(tiny):
    single = build_method({"name": "rlcf", "sample_k": 1}, tiny)
    with pytest.raises(RuntimeError, match="attach_reward"):
        single.set_classes(["red square", "blue circle"])


@pytest.mark.parametrize(
    ("section", "prompt"),
    [
        ({"tune": "encoder", "underscore_prompts": True}, "a_photo_of_a red square."),  # the reference's quirk
        ({"tune": "prompt", "template": "a drawing of a {}."}, "a drawing of a red square."),
    ],
    ids=["underscore-quirk", "template"],
)
def test_reward_text_is_the_policys_hard_prompt_of_each_class(section, prompt):
    rlcf = build_method({"name": "rlcf", **section}, _fresh())
    spy = TextSpy()
    rlcf.attach_reward(spy)
    rlcf.set_classes(["red square", "blue circle"])
    rlcf.set_classes(["red square", "blue circle"])  # cached: one reward forward per class list
    assert spy.texts == [[prompt, prompt.replace("red square", "blue circle")]]
    assert rlcf.reward_text[0].shape == (2, 4)


# ---- retrieval ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "pure_bf16"])
def test_t2i_tunes_query_rows_like_the_frozen_table(precision):
    """Default t2i: the token-embedding table is frozen and a row buffer of its width and dtype is tuned."""
    b = _fresh(precision)
    method = build_method({"name": "rlcf_retrieval", "direction": "t2i"}, b)
    table = b.text.src.token_embedding.weight
    assert isinstance(method.rows, nn.Parameter) and method.rows.requires_grad and not table.requires_grad
    assert method.rows.shape == (b.context_length, table.shape[1]) and method.rows.dtype == table.dtype
    assert any(p is method.rows for p in method.trainable_parameters())
    whole = build_method({"name": "rlcf_retrieval", "direction": "t2i", "embedding_rows": False}, _fresh())
    assert whole.rows is None and whole.backbone.text.src.token_embedding.weight.requires_grad
    assert build_method({"name": "rlcf_retrieval", "direction": "i2t"}, _fresh()).rows is None


def test_queries_are_encoded_by_the_tuned_tower_through_their_rows():
    b = _fresh()
    i2t = build_method({"name": "rlcf_retrieval", "direction": "i2t"}, b)
    image = _images(1, b.image_size)
    with torch.no_grad():
        want = F.normalize(b.encode_image(image), dim=-1)
        torch.testing.assert_close(i2t.encode_query(image), want, atol=1e-5, rtol=1e-5)
    b = _fresh()
    t2i = build_method({"name": "rlcf_retrieval", "direction": "t2i"}, b)
    tokens = b.tokenize(TEXTS[1:2])
    episode = t2i.begin(tokens, [])
    feats = t2i.encode_query(episode.views)
    with torch.no_grad():
        want = F.normalize(b.encode_text(tokens), dim=-1)
    torch.testing.assert_close(feats.detach(), want, atol=1e-5, rtol=1e-5)  # rows start as the table's rows
    feats.sum().backward()
    used = len(torch.unique(episode.views))
    assert t2i.rows.grad is not None and t2i.rows.grad[:used].abs().sum(-1).min() > 0  # the rows feed the query
    assert not t2i.rows.grad[used:].any()


def test_retrieval_loss_is_reinforce_on_scaled_cosines_and_keeps_the_start_ranking():
    b = _fresh()
    method = build_method({"name": "rlcf_retrieval", "direction": "i2t", "sample_k": 6}, b)
    method.attach_reward(IndexScore())  # K = every candidate: the loss does not depend on their order
    candidates = F.normalize(torch.randn(6, b.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    method.set_candidates(candidates, [])
    image = _images(1, b.image_size)
    with torch.no_grad():
        start = b.model.logit_scale.exp() * F.normalize(b.encode_image(image), dim=-1) @ candidates.t()
    episode = method.begin(image, [])
    loss = method.loss(episode, 0)
    every = torch.arange(6).unsqueeze(0)
    assert float(loss.detach()) == pytest.approx(
        float(reinforce_loss(start, every, baseline_rewards(every.float()))), rel=1e-5
    )
    torch.testing.assert_close(episode.before, start[0])
    loss.backward()
    torch.optim.SGD(method.trainable_parameters(), lr=0.5).step()
    method.loss(episode, 1)
    torch.testing.assert_close(episode.before, start[0])  # the start point's ranking, not the last step's


def test_caption_queries_stop_at_their_end_of_text_and_predict_as_the_full_context():
    method = build_method({"name": "rlcf_retrieval", "direction": "t2i"}, _fresh())
    b = method.backbone
    method.set_candidates(
        F.normalize(torch.randn(5, b.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1), []
    )
    tokens = b.tokenize(TEXTS[:1])
    end = int(b.text.pool_positions(tokens)[0])
    assert end + 2 < tokens.shape[1]
    cut = method.begin(tokens, [])
    assert torch.equal(cut.views, tokens[:, : end + 1])  # the default: nothing after end-of-text is run
    predicted = method.predict(cut)
    method.truncate_text = False  # the reference's full context
    full = method.begin(tokens, [])
    assert torch.equal(full.views, tokens)
    torch.testing.assert_close(method.predict(full), predicted, atol=1e-5, rtol=1e-5)
