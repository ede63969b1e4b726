"""Captioning RLCF: the REINFORCE loss over K beams in one batched pass, gradients, and the episodic restore."""

from __future__ import annotations

import pytest
import torch

from backbone.caption_helpers import tiny_captioner  # tests/ is on sys.path (rootdir-relative packages)
from vlprompt.backbone import load_backbone
from vlprompt.methods.captioning import caption_losses, teacher_forcing
from vlprompt.methods.rlcf import CLIPSCORE_WEIGHT, RewardCLIP
from vlprompt.methods.rlcf_caption import RLCFCaption, RLCFCaptionOptions
from vlprompt.runners.tta import EpisodicState, adapt


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


@pytest.fixture(scope="module")
def rewards():
    torch.manual_seed(1)
    first = load_backbone("vlprompt-tiny", None)
    torch.manual_seed(2)
    return [first, load_backbone("vlprompt-tiny", None)]


def _policy(clip, reward: RewardCLIP, quirks: bool = False) -> RLCFCaption:
    options = RLCFCaptionOptions(prefix_length=4, sample_k=3, max_new_tokens=6, final_beams=2,
                                 reference_loss_quirks=quirks)  # fmt: skip
    method = RLCFCaption(clip, options, captioner=tiny_captioner(clip_dim=clip.embed_dim, clip_bpe=True))
    method.attach_reward(reward)
    return method


def _image(clip, seed: int) -> torch.Tensor:
    return torch.randn(1, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quirks", [False, True])
def test_loss_is_mean_of_baselined_clipscore_times_per_caption_ce(clip, rewards, quirks: bool) -> None:
    """RLCF-S (two reward CLIPs, weights 0.75 / 0.25); the K captions' CE in one batched pass equals K separate
    passes in the clean layout (pads masked). The quirky layout's per-caption CE depends on the batch, by design."""
    reward = RewardCLIP(rewards, [3.0, 1.0])
    m = _policy(clip, reward, quirks)
    image = _image(clip, 0)
    ep = m.begin(image)
    loss = m.loss(ep, 0)
    captions = ep.extra["captions"]
    assert len(captions) == 3
    prefix = m.captioner.prefix(ep.extra["embedding"])
    tok = m.captioner.tokenizer
    if quirks:
        ce = caption_losses(m.captioner, prefix, teacher_forcing(tok, captions, reference_quirks=True))
    else:
        ce = torch.stack([caption_losses(m.captioner, prefix, teacher_forcing(tok, [c]))[0] for c in captions])
    score = torch.zeros(3)
    for weight, model in zip([0.75, 0.25], rewards):
        img = torch.nn.functional.normalize(model.encode_image(image).float(), dim=-1)[0]
        txt = torch.nn.functional.normalize(model.encode_text(model.tokenize(captions)).float(), dim=-1)
        score += weight * CLIPSCORE_WEIGHT * (txt * img).sum(-1).clamp(min=0)
    r = score - score.mean()
    assert r.abs().sum() > 1e-3  # these seeds give candidates the reward tells apart
    torch.testing.assert_close(m.rewards(ep, captions), r.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (r.detach() * ce).mean(), rtol=1e-5, atol=1e-6)


def test_only_the_mapper_gets_gradients(clip, rewards) -> None:
    reward = RewardCLIP(rewards[:1])
    m = _policy(clip, reward)
    m.loss(m.begin(_image(clip, 0)), 0).backward()
    mapper = {id(p) for p in m.captioner.mapper.parameters()}
    assert all((p.grad is not None) == (id(p) in mapper) for p in m.parameters())
    assert all(p.grad is None for p in reward.parameters())


def test_episode_restores_mapper_and_optimizer_bit_for_bit(clip, rewards) -> None:
    reward = RewardCLIP(rewards[:1])
    m = _policy(clip, reward)
    params = m.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2, eps=1e-6, weight_decay=0.0)  # the reference's settings
    state = EpisodicState(params, optimizer)
    start = [p.detach().clone() for p in params]

    ep = m.begin(_image(clip, 0))
    adapt(m, ep, 2, optimizer)
    assert not all(torch.equal(p, s) for p, s in zip(params, start))  # it adapted
    assert isinstance(m.predict(ep), str)
    state.finish_sample()
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert all(p.grad is None for p in params)
    assert all(not t.any() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))

    # the next image after a restore adapts as it would first: same caption, same adapted mapper
    ep = m.begin(_image(clip, 1))
    adapt(m, ep, 2, optimizer)
    after_restore = (m.predict(ep), [p.detach().clone() for p in params])
    fresh = _policy(clip, reward)
    fresh_params = fresh.trainable_parameters()
    ep = fresh.begin(_image(clip, 1))
    adapt(fresh, ep, 2, torch.optim.AdamW(fresh_params, lr=1e-2, eps=1e-6, weight_decay=0.0))
    assert fresh.predict(ep) == after_restore[0]
    for a, b in zip(fresh_params, after_restore[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reward_text_features_are_computed_once_per_distinct_caption(clip, rewards) -> None:
    """Frozen rewards: a caption seen earlier for this image (or twice in one step) is not encoded again, and the
    cached features give the rewards a fresh encoding gives."""
    reward = RewardCLIP(rewards, [3.0, 1.0])
    m = _policy(clip, reward)
    ep = m.begin(_image(clip, 0))
    encoded: list[list[str]] = []
    real = reward.text_features

    def spy(texts, *args, **kwargs):
        encoded.append(list(texts))
        return real(texts, *args, **kwargs)

    reward.text_features = spy
    first = ["a red star", "a blue circle", "a red star"]
    got = m.rewards(ep, first)
    assert encoded == [["a red star", "a blue circle"]]
    second = ["a blue circle", "a green square", "a red star"]
    got2 = m.rewards(ep, second)
    assert encoded[1:] == [["a green square"]]
    reward.text_features = real
    for captions, value in ((first, got), (second, got2)):
        index = torch.arange(len(captions)).unsqueeze(0)
        fresh = reward.score(ep.extra["reward_image"], reward.text_features(captions), index)
        torch.testing.assert_close(value, (fresh - fresh.mean(dim=-1, keepdim=True))[0], rtol=1e-5, atol=1e-6)
    other = m.begin(_image(clip, 1))  # a new image starts with no cache
    reward.text_features = spy
    m.rewards(other, ["a red star"])
    assert encoded[-1] == ["a red star"]
