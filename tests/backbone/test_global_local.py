"""DGL's global-local video attention: the factorised block equals dense attention under the mask."""

from __future__ import annotations

import copy

import pytest
import torch

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone.towers import run_block, run_global_local_block


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def dense_mask(globals_: int, frames: int, length: int) -> torch.Tensor:
    """Bool mask over [G | T*L]: global rows see all; frame rows see globals and their own frame."""
    total = globals_ + frames * length
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:globals_] = True
    mask[:, :globals_] = True
    for t in range(frames):
        s = globals_ + t * length
        mask[s : s + length, s : s + length] = True
    return mask


def test_factorised_block_equals_dense_mask(tiny) -> None:
    block = tiny.vision.blocks[0]
    batch, frames, length, width, globals_ = 2, 3, 5, tiny.vision_width, 4
    g = torch.randn(batch, globals_, width)
    f = torch.randn(batch * frames, length, width)
    with torch.no_grad():
        g_out, f_out = run_global_local_block(block, g, f)
        seq = torch.cat([g, f.reshape(batch, frames * length, width)], dim=1)
        dense = run_block(block, seq, dense_mask(globals_, frames, length))
    assert torch.allclose(g_out, dense[:, :globals_], atol=1e-5)
    assert torch.allclose(f_out.reshape(batch, frames * length, width), dense[:, globals_:], atol=1e-5)


def test_frames_exchange_information_only_through_globals(tiny) -> None:
    frames = torch.randn(1, 3, 3, 64, 64, requires_grad=True)
    plan = PromptPlan(global_tokens=torch.randn(4, tiny.vision_width))
    x = tiny.vision.embed(frames.flatten(0, 1), plan)
    g = plan.global_tokens[None]
    g1, f1 = run_global_local_block(tiny.vision.blocks[0], g, x)
    # after block 0, frame 0's tokens do not depend on frame 1's pixels; the globals depend on every frame
    (grad_f,) = torch.autograd.grad(f1[0].sum(), frames, retain_graph=True)
    assert grad_f[0, 1].abs().max() == 0 and grad_f[0, 0].abs().max() > 0
    (grad_g,) = torch.autograd.grad(g1.sum(), frames, retain_graph=True)
    assert all(grad_g[0, t].abs().max() > 0 for t in range(3))
    # after block 1 they do
    g2, f2 = run_global_local_block(tiny.vision.blocks[1], g1, f1)
    (grad_f2,) = torch.autograd.grad(f2[0].sum(), frames)
    assert grad_f2[0, 1].abs().max() > 0


def test_tower_video_output_shapes_and_batch_independence(tiny) -> None:
    torch.manual_seed(1)
    video = torch.randn(3, 4, 3, 64, 64)
    plan = PromptPlan(
        insert=torch.randn(2, tiny.vision_width),
        replace={1: torch.randn(2, tiny.vision_width)},
        global_tokens=torch.randn(4, tiny.vision_width),
    )
    with torch.no_grad():
        out = tiny.vision(video, plan)
        single = tiny.vision(video[1:2], plan)
    assert out.pooled.shape == (3, tiny.embed_dim)
    assert out.frames.shape == (3, 4, tiny.embed_dim)
    assert torch.allclose(out.pooled[1:2], single.pooled, atol=1e-5)


def test_global_tokens_need_frames(tiny) -> None:
    with pytest.raises(ValueError, match="frame input"):
        tiny.vision(torch.randn(2, 3, 64, 64), PromptPlan(global_tokens=torch.randn(4, tiny.vision_width)))


def test_global_tokens_refuse_prefix_or_mask_alone_and_layers_past_the_tower(tiny) -> None:
    frames = torch.randn(1, 2, 3, 64, 64)
    width, layers = tiny.vision_width, tiny.vision.num_layers
    g = torch.randn(2, width)
    kv = (torch.randn(2, width), torch.randn(2, width))
    with pytest.raises(ValueError, match="cannot be combined"):
        tiny.vision(frames, PromptPlan(global_tokens=g, prefix={0: kv}))
    with pytest.raises(ValueError, match="cannot be combined"):
        tiny.vision(frames, PromptPlan(global_tokens=g, attn_mask=torch.ones(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="touches layer"):
        tiny.vision(frames, PromptPlan(global_tokens=g, replace={layers: torch.randn(1, width)}))


def test_global_tokens_take_the_frames_dtype(tiny) -> None:
    frames = torch.randn(1, 2, 3, 64, 64)
    g = torch.randn(2, tiny.vision_width)
    with torch.no_grad():
        ref = tiny.vision(frames, PromptPlan(global_tokens=g))
        out = tiny.vision(frames, PromptPlan(global_tokens=g.double()))
    assert out.pooled.dtype == torch.float32
    assert torch.allclose(out.pooled, ref.pooled, atol=1e-5)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_deep_frame_prompts_under_global_tokens_match_a_manual_loop(tiny, mode: str) -> None:
    """Under global-local attention, ``replace``/``add`` at layer l overwrite/add the frame tokens' prompt span
    before block l (never the globals); pooled = projected global token 0, frames = projected CLS of each frame."""
    torch.manual_seed(2)
    width, batch, frames_n, n = tiny.vision_width, 2, 3, 2
    video = torch.randn(batch, frames_n, 3, 64, 64)
    deep = {1: torch.randn(n, width), 2: torch.randn(n, width)}
    plan = PromptPlan(insert=torch.randn(n, width), global_tokens=torch.randn(3, width), **{mode: deep})
    v = tiny.vision.visual
    with torch.no_grad():
        out = tiny.vision(video, plan, return_tokens=True)
        f = tiny.vision.embed(video.flatten(0, 1), PromptPlan(insert=plan.insert))
        g = plan.global_tokens.expand(batch, -1, -1)
        for layer, block in enumerate(tiny.vision.blocks):
            if layer in deep:
                f = f.clone()
                f[:, 1 : 1 + n] = deep[layer] if mode == "replace" else f[:, 1 : 1 + n] + deep[layer]
            g, f = run_global_local_block(block, g, f)
        pooled = v.ln_post(g[:, 0]) @ v.proj
        frame_pooled = (v.ln_post(f[:, 0]) @ v.proj).unflatten(0, (batch, frames_n))
    assert torch.allclose(out.pooled, pooled, atol=1e-5)
    assert torch.allclose(out.frames, frame_pooled, atol=1e-5)
    assert torch.allclose(out.tokens, g, atol=1e-5)  # return_tokens gives the final global tokens
    assert tiny.vision(video, plan).tokens is None


def test_global_local_grad_checkpointing_gives_same_outputs_and_gradients(tiny) -> None:
    torch.manual_seed(3)
    video = torch.randn(1, 2, 3, 64, 64)
    tokens = torch.randn(2, tiny.vision_width, requires_grad=True)
    glob = torch.randn(2, tiny.vision_width, requires_grad=True)
    results = []
    for enable in (False, True):
        tiny.vision.set_grad_checkpointing(enable)
        try:
            out = tiny.vision(video, PromptPlan(insert=tokens, add={1: tokens}, global_tokens=glob))
            grads = torch.autograd.grad(out.pooled.sum() + out.frames.sum(), (tokens, glob))
        finally:
            tiny.vision.set_grad_checkpointing(False)
        results.append((out.pooled.detach(), *grads))
    for plain, checkpointed in zip(results[0], results[1]):
        assert torch.allclose(plain, checkpointed, atol=1e-5)


def test_factorised_block_uses_the_attention_input_bias(tiny) -> None:
    """open_clip initialises ``in_proj_bias`` to zero, which hides a dropped bias; trained weights have one."""
    block = copy.deepcopy(tiny.vision.blocks[0])
    with torch.no_grad():
        block.attn.in_proj_bias.normal_(0.0, 0.5)
    batch, frames, length, width, globals_ = 2, 2, 4, tiny.vision_width, 3
    g = torch.randn(batch, globals_, width)
    f = torch.randn(batch * frames, length, width)
    with torch.no_grad():
        g_out, f_out = run_global_local_block(block, g, f)
        seq = torch.cat([g, f.reshape(batch, frames * length, width)], dim=1)
        dense = run_block(block, seq, dense_mask(globals_, frames, length))
    assert torch.allclose(g_out, dense[:, :globals_], atol=1e-5)
    assert torch.allclose(f_out.reshape(batch, frames * length, width), dense[:, globals_:], atol=1e-5)
