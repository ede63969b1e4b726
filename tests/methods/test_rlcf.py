"""RLCF: the REINFORCE core (closed-form gradient), rewards, both classification variants, and retrieval."""

from __future__ import annotations

import pytest
import torch

from vlprompt.backbone import load_backbone
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.rlcf import (
    CLIPSCORE_WEIGHT,
    RewardCLIP,
    baseline_rewards,
    reinforce_loss,
    reward_weights,
)

CLASSES = ["red square", "blue circle", "green triangle", "yellow star", "purple heart"]


@pytest.fixture(scope="module")
def reward() -> RewardCLIP:
    torch.manual_seed(1)
    return RewardCLIP([load_backbone("vlprompt-tiny", None)])


def _policy(section: dict, reward: RewardCLIP):
    torch.manual_seed(0)
    method = build_method(section, load_backbone("vlprompt-tiny", None))
    method.attach_reward(reward)
    return method


def _views(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _zero_mean_case(s: int = 4, c: int = 7, k: int = 3):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(s, c, generator=g, dtype=torch.float64) * 3
    candidates = logits.topk(k, dim=-1).indices
    rewards = baseline_rewards(torch.rand(s, k, generator=g, dtype=torch.float64) * 2.5)
    return logits, candidates, rewards


def test_logit_gradient_is_minus_reward_over_sk_at_candidates_by_finite_differences() -> None:
    logits, candidates, rewards = _zero_mean_case()
    s, k = candidates.shape
    expected = torch.zeros_like(logits)
    expected.scatter_(1, candidates, -rewards / (s * k))
    numeric = torch.zeros_like(logits)
    h = 1e-6
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            step = torch.zeros_like(logits)
            step[i, j] = h
            up = reinforce_loss(logits + step, candidates, rewards)
            down = reinforce_loss(logits - step, candidates, rewards)
            numeric[i, j] = (up - down) / (2 * h)
    assert torch.allclose(numeric, expected, atol=1e-8)
    assert (numeric[expected == 0].abs() < 1e-8).all()  # zero off the candidates
    z = logits.clone().requires_grad_(True)
    reinforce_loss(z, candidates, rewards).backward()
    assert torch.allclose(z.grad, expected, atol=1e-12)


def test_flipping_rewards_flips_the_gradient_and_a_step_raises_positive_candidates() -> None:
    logits, candidates, rewards = _zero_mean_case()
    grads = []
    for sign in (1.0, -1.0):
        z = logits.clone().requires_grad_(True)
        reinforce_loss(z, candidates, sign * rewards).backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], -grads[1])
    stepped = logits - 0.5 * grads[0]  # one SGD step on the logits
    s, k = torch.nonzero(rewards > 0)[0].tolist()
    best, worst = candidates[s, k], candidates[s, rewards[s].argmin()]
    assert stepped[s, best] - stepped[s, worst] > logits[s, best] - logits[s, worst]


def test_baseline_sums_to_zero_and_k1_keeps_raw_scores() -> None:
    scores = torch.rand(6, 3)
    assert baseline_rewards(scores).sum(-1).abs().max() < 1e-6
    assert torch.equal(baseline_rewards(scores[:, :1]), scores[:, :1])


def test_reward_weights_follow_the_paper() -> None:
    assert reward_weights([10, 3, 5], 3) == [0.56, 0.17, 0.28]
    assert reward_weights([], 1) == [1.0]
    assert reward_weights([], 2) == [0.5, 0.5]
    with pytest.raises(ConfigError):
        reward_weights([1, 2], 3)


def test_clip_score_is_clamped_cosine_times_weight_and_ensembles_weighted() -> None:
    torch.manual_seed(0)
    models = [load_backbone("vlprompt-tiny", None), load_backbone("vlprompt-tiny", None)]
    ensemble = RewardCLIP(models, [10, 3])
    images, texts = _views(4), [f"a photo of a {c}." for c in CLASSES]
    img = ensemble.image_features(images, models[0].image_mean, models[0].image_std)
    txt = ensemble.text_features(texts)
    index = torch.tensor([[0, 1, 2]] * 4)
    score = ensemble.score(img, txt, index)
    manual = sum(w * CLIPSCORE_WEIGHT * (img[m] @ txt[m].t()).clamp(min=0).gather(1, index)
                 for m, w in enumerate([0.77, 0.23]))  # fmt: skip
    assert torch.allclose(score, manual, atol=1e-6)
    assert (score >= 0).all() and (score <= CLIPSCORE_WEIGHT).all()
    assert all(not p.requires_grad for p in ensemble.parameters())


@pytest.mark.parametrize("tune", ["prompt", "encoder"])
def test_rlcf_adapts_only_its_tensors_and_never_the_reward(reward: RewardCLIP, tune: str) -> None:
    method = _policy({"name": "rlcf", "tune": tune, "sample_k": 3}, reward)
    method.set_classes(CLASSES)
    reward_before = [p.clone() for p in reward.parameters()]
    frozen_before = {n: p.clone() for n, p in method.named_parameters() if not p.requires_grad}
    params = method.trainable_parameters()
    start = [p.clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    episode = method.begin(_views(), keep=0.25)
    assert len(episode.selected) == 2 and len(episode.extra["reward_image"][0]) == 2
    for step in range(2):
        loss = method.loss(episode, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(params, start))
    assert all(torch.equal(a, b) for a, b in zip(reward.parameters(), reward_before))
    assert all(torch.equal(p, frozen_before[n]) for n, p in method.named_parameters() if n in frozen_before)
    assert method.predict(episode).shape == (len(CLASSES),)


def test_encoder_variant_trains_the_image_tower_or_its_norms(reward: RewardCLIP) -> None:
    everything = _policy({"name": "rlcf", "tune": "encoder"}, reward)
    visual = {id(p) for p in everything.backbone.vision.visual.parameters()}
    assert {id(p) for p in everything.trainable_parameters()} == visual
    norms = _policy({"name": "rlcf", "tune": "encoder", "encoder_params": "norm"}, reward)
    names = [n for n, p in norms.named_parameters() if p.requires_grad]
    assert names and all(".ln" in n or "ln_" in n for n in names)


def test_reference_prompt_quirk_only_behind_its_switch(reward: RewardCLIP) -> None:
    clean = _policy({"name": "rlcf", "tune": "encoder"}, reward)
    assert clean.hard_template == "a photo of a {}."
    quirk = _policy({"name": "rlcf", "tune": "encoder", "underscore_prompts": True}, reward)
    assert quirk.hard_template == "a_photo_of_a {}."
    quirk.set_classes(CLASSES)
    clean.set_classes(CLASSES)
    assert quirk.class_tokens.shape == clean.class_tokens.shape
    assert not torch.equal(quirk.class_tokens, clean.class_tokens)  # the underscores are tokens of their own


def test_retrieval_query_rows_match_tuning_the_whole_embedding_table(reward: RewardCLIP) -> None:
    outputs = []
    for rows in (True, False):
        method = _policy({"name": "rlcf_retrieval", "direction": "t2i", "sample_k": 4, "embedding_rows": rows},
                         reward)  # fmt: skip
        b = method.backbone
        images = _views(6)
        method.set_candidates(method.encode_image(images), reward.image_features(images, b.image_mean, b.image_std))
        query = b.tokenize(["a small red square left of a blue circle"])
        optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3, weight_decay=5e-4, eps=1e-6)
        episode = method.begin(query, reward.text_features(["a small red square left of a blue circle"]))
        for step in range(3):
            loss = method.loss(episode, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        outputs.append(method.predict(episode))
    assert outputs[0].shape == (6,)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_retrieval_directions_tune_their_tower(reward: RewardCLIP) -> None:
    i2t = _policy({"name": "rlcf_retrieval", "direction": "i2t"}, reward)
    assert all(n.startswith("backbone.model.visual.") for n, p in i2t.named_parameters() if p.requires_grad)
    t2i = _policy({"name": "rlcf_retrieval", "direction": "t2i", "embedding_rows": False}, reward)
    tuned = [n for n, p in t2i.named_parameters() if p.requires_grad]
    assert "backbone.model.logit_scale" in tuned and not any(".visual." in n for n in tuned)
    with pytest.raises(ConfigError):
        _policy({"name": "rlcf_retrieval", "direction": "both"}, reward)


def test_reward_images_are_renormalised_and_resized_for_each_reward_model() -> None:
    from vlprompt.methods.rlcf import RewardEncoder

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))
            self.visual = torch.nn.Module()
            self.visual.output_dim = 3
            self.seen: list[torch.Tensor] = []

        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x)
            return x.mean(dim=(2, 3))

    model = Recorder()
    reward = RewardCLIP([RewardEncoder(model, None, 48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    policy_mean, policy_std = (0.4, 0.45, 0.5), (0.2, 0.3, 0.4)
    normalised = (pixels - torch.tensor(policy_mean).view(1, 3, 1, 1)) / torch.tensor(policy_std).view(1, 3, 1, 1)
    reward.image_features(normalised, policy_mean, policy_std)
    seen = model.seen[0]
    assert seen.shape == (2, 3, 48, 48)
    expected = torch.nn.functional.interpolate((pixels - 0.5) / 0.25, size=48, mode="bicubic", align_corners=True)
    assert torch.allclose(seen, expected, atol=1e-5)


def test_reward_text_features_through_the_tower_equal_open_clips() -> None:
    """A reward built from a backbone encodes texts with the promptable tower (padding after end-of-text dropped):
    the same features as open_clip's ``encode_text`` on the full context, and the tower is really used."""
    import vlprompt
    from vlprompt.methods.rlcf import RewardEncoder

    torch.manual_seed(0)
    b = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)
    enc = RewardEncoder.from_backbone(b)
    texts = ["a red star", "a small dotted red crescent right of a small orange digit 3"]
    with torch.no_grad():
        ours = enc.encode_text(texts)
        ref = b.model.encode_text(b.tokenizer(texts))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert enc.text_tower is b.text
    assert "text_tower" not in dict(enc.named_children())  # one set of weights in the module tree
