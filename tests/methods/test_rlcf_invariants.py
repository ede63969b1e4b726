"""RLCF invariants that a one-line change would break (issue 14, mutation testing): which reward models and
weights are used, the baseline, the REINFORCE loss's precision, K, and which candidates are scored."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone import load_backbone
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.rlcf import RewardOptions, baseline_rewards, reinforce_loss, reward_specs, reward_weights
from vlprompt.methods.tpt import Episode


class IndexScore:
    """A stand-in reward: candidate ``c`` scores ``c`` (so rewards depend on which candidates were chosen)."""

    def score(self, query, candidates, index: torch.Tensor) -> torch.Tensor:
        return index.float()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


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
