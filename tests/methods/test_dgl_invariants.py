"""DGL invariants that a one-line change would break (issue 14, mutation testing): where each prompt enters at which
layers, what each video read-out pools, where the postfix goes, and the depth and frame-count checks.

The golden test covers the reference's behaviour (``global_prompt0``, ``inert``); these cover the paper's and the
other read-outs, whose values the golden fixture does not hold.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlprompt
from vlprompt.methods import build_method
from vlprompt.methods.dgl import torch_cat_mean


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _dgl(tiny, **options):
    torch.manual_seed(1)
    return build_method({"name": "dgl", "frames": 3, **options}, tiny).eval()


def _video(n: int = 2, frames: int = 3) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(n, frames, 3, 64, 64)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
def test_plans_put_frame_prompts_text_prefixes_and_globals_at_every_prompt_layer(tiny, latent: str) -> None:
    method = _dgl(tiny, latent=latent, depth=3, postfix="before_eot")
    with torch.no_grad():
        p = method.prompts()
        plans = method.plans()
    frames = p.frames if latent == "linear" else p.frames.transpose(0, 1)  # [K, P, D] or [T, K, P, D]
    layer = (lambda k: frames[k]) if latent == "linear" else (lambda k: frames[:, k])
    assert torch.equal(plans.image.insert, layer(0))  # layer 0: inserted
    assert sorted(plans.image.replace) == [1, 2]  # deeper prompt layers: replaced, no more than depth
    for k in (1, 2):
        assert torch.equal(plans.image.replace[k], layer(k))
        assert torch.equal(plans.text.replace[k], p.prefix()[k])
    assert torch.equal(plans.image.global_tokens, p.globals)
    assert torch.equal(plans.text.insert, p.prefix()[0])
    assert sorted(plans.text.replace) == [1, 2]
    assert sorted(plans.text.suffix) == [0, 1, 2]  # before end-of-text at every prompt layer
    assert all(torch.equal(plans.text.suffix[k], p.postfix()[k]) for k in range(3))
    assert _dgl(tiny, latent=latent, postfix="inert").plans().text.suffix in (None, {})


def test_depth_defaults_to_every_layer_and_is_bounded(tiny) -> None:
    layers = min(tiny.vision.num_layers, tiny.text.num_layers)
    assert _dgl(tiny, latent="linear").prompts.depth == layers
    assert _dgl(tiny, latent="linear", depth=layers).prompts.depth == layers
    assert _dgl(tiny, latent="linear", depth=1).plans().image.replace == {}
    with pytest.raises(ValueError, match="depth"):
        _dgl(tiny, latent="linear", depth=layers + 1)
    with pytest.raises(ValueError, match="frames"):
        build_method({"name": "dgl", "latent": "transformer"}, tiny)  # the transformer needs the frame count
    gen = _dgl(tiny, latent="transformer").prompts
    assert gen.n_text == 2 * gen.n_local and gen.frames == 3  # P prefix + P postfix rows, T frames
    assert gen.block.attn.num_heads == tiny.vision.blocks[0].attn.num_heads


@pytest.mark.parametrize("how", ["frame_mean", "global_prompt0", "global_mean", "global_and_frame_mean"])
def test_each_video_read_out_pools_what_it_names(tiny, how: str) -> None:
    method = _dgl(tiny, latent="linear", video_embedding=how)
    video = _video()
    with torch.no_grad():
        got = method.encode_video(video)
        out = tiny.vision(video, method.plans().image, return_tokens=True)
        globals_ = tiny.vision.project_tokens(out.tokens)  # [B, G, E], global token 0 first
        want = {
            "frame_mean": out.frames.mean(1),
            "global_prompt0": out.pooled,
            "global_mean": globals_.mean(1),
            "global_and_frame_mean": torch.cat([globals_, out.frames], 1).mean(1),
        }[how]
    torch.testing.assert_close(got, F.normalize(want, dim=-1), atol=1e-5, rtol=0)
    others = {"frame_mean", "global_prompt0", "global_mean", "global_and_frame_mean"} - {how}
    with torch.no_grad():
        for other in others:
            method.options.video_embedding = other
            assert not torch.allclose(method.encode_video(video), got, atol=1e-4), other


def test_cat_mean_weighs_every_token_once() -> None:
    a = torch.tensor([[[1.0], [3.0]]])  # two tokens
    b = torch.tensor([[[8.0], [0.0], [4.0]]])  # three tokens
    assert float(torch_cat_mean(a, b)) == pytest.approx(16.0 / 5)


def test_transformer_checks_the_frame_count_and_images_are_one_frame_videos(tiny) -> None:
    method = _dgl(tiny, latent="transformer")
    with pytest.raises(ValueError, match="prompts for 3 frames"):
        method.encode_video(_video(1, 2))
    linear = _dgl(tiny, latent="linear")
    images = _video(2, 1)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(linear.encode_image(images), linear.encode_video(images.unsqueeze(1)))
        assert linear.encode_video(_video(1, 2)).shape == (1, tiny.embed_dim)  # the linear one takes any T


def test_given_plans_are_used_as_given(tiny) -> None:
    """Evaluation computes the plans once and passes them in: the encoders must not regenerate them."""
    method = _dgl(tiny, latent="linear")
    video = _video()
    images = video[:, 0]
    with torch.no_grad():
        plans = method.plans()
        video_before, image_before = method.encode_video(video), method.encode_image(images)
        for name in ("global_prompts", "visual"):  # new tensors: the plans keep views of the old ones
            setattr(method.prompts, name, torch.nn.Parameter(torch.randn_like(getattr(method.prompts, name))))
        torch.testing.assert_close(method.encode_video(video, None, plans), video_before)
        torch.testing.assert_close(method.encode_image(images, plans), image_before)
        assert not torch.allclose(method.encode_video(video), video_before, atol=1e-4)


def test_transformer_accepts_single_frame_videos(tiny) -> None:
    method = _dgl(tiny, latent="transformer", frames=1)
    assert method.prompts.frames == 1
    with torch.no_grad():
        assert method.encode_image(_video(2, 1)[:, 0]).shape == (2, tiny.embed_dim)
