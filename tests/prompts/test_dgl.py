"""DGL's prompt generators: the parameter counts and shapes of the spec (section 4 and 10)."""

from __future__ import annotations

import pytest
import torch

from vlprompt.prompts import DGLLinearPrompts, DGLTransformerPrompts


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("patch", [32, 16])
def test_linear_counts_and_shapes(patch: int) -> None:
    gen = DGLLinearPrompts(depth=12, n_local=4, n_global=4, vision_width=768, text_width=512, patch=patch)
    assert count(gen) == 827_392  # independent of T and of B/32 vs B/16
    out = gen()
    assert out.text.shape == (12, 8, 512)
    assert out.frames.shape == (12, 4, 768)
    assert out.globals.shape == (4, 768)
    bound = (6 / (3 * patch * patch + 768)) ** 0.5
    assert gen.visual.abs().max() <= bound and gen.visual.abs().max() > 0.9 * bound
    # layer k uses columns k*Dv:(k+1)*Dv of the [1, P, K*Dv] table
    assert torch.equal(out.frames[3, 1], gen.visual[0, 1, 3 * 768 : 4 * 768])


@pytest.mark.parametrize(("frames", "expected"), [(12, 9_575_168), (64, 11_492_096)])
def test_transformer_counts(frames: int, expected: int) -> None:
    gen = DGLTransformerPrompts(
        depth=12, n_local=4, n_global=4, n_text=8, frames=frames, vision_width=768, text_width=512, patch=32, heads=12
    )
    assert count(gen) == expected


def test_transformer_shapes_and_frame_major_rows() -> None:
    gen = DGLTransformerPrompts(depth=3, n_local=2, n_global=2, n_text=4, frames=5, vision_width=64, text_width=32,
                                patch=8, heads=4)  # fmt: skip
    out = gen()
    assert out.text.shape == (3, 4, 32)
    assert out.frames.shape == (3, 5, 2, 64)
    assert out.prefix().shape == out.postfix().shape == (3, 2, 32)
    # frame t's prompts come from rows n_text + t*P ... : perturbing row 4 + 2*2 changes frame 2 (and, through the
    # block, the others), so check the direct mapping with the block bypassed
    gen.block = torch.nn.Identity()
    out = gen()
    table = gen.embedding.weight.view(4 + 10, 3, 64).transpose(0, 1)
    assert torch.equal(out.frames[1, 2, 0], table[1, 4 + 2 * 2])


def test_global_prompts_are_uniform_in_the_vpt_range_and_returned_by_both_generators() -> None:
    torch.manual_seed(0)
    lin = DGLLinearPrompts(depth=2, n_local=64, n_global=64, vision_width=64, text_width=32, patch=8)
    bound = (6 / (3 * 8 * 8 + 64)) ** 0.5
    for table in (lin.visual, lin.global_prompts):
        assert table.min() < -0.9 * bound and table.max() > 0.9 * bound  # U(-b, b), symmetric
    gen = DGLTransformerPrompts(depth=2, n_local=2, n_global=3, n_text=4, frames=2, vision_width=16, text_width=8,
                                patch=8, heads=2)  # fmt: skip
    assert torch.equal(gen().globals, gen.global_prompts[0])
    assert torch.equal(lin().globals, lin.global_prompts[0])


def test_transformer_generator_uses_quickgelu_in_the_block_and_between_the_mlp_layers() -> None:
    """The reference's prompt block and text MLP are CLIP's (QuickGELU), the MLP ``Dv -> 2Dv -> Dt``."""
    from open_clip.transformer import QuickGELU

    torch.manual_seed(0)
    gen = DGLTransformerPrompts(depth=2, n_local=2, n_global=1, n_text=4, frames=2, vision_width=16, text_width=8,
                                patch=8, heads=2)  # fmt: skip
    assert isinstance(gen.block.mlp.gelu, QuickGELU)
    assert [type(m) for m in gen.mlp] == [torch.nn.Linear, QuickGELU, torch.nn.Linear]
    out = gen()
    rows = gen.embedding.weight.shape[0]
    z = gen.block(gen.embedding.weight.view(rows, 2, 16).transpose(0, 1))
    first, second = gen.mlp[0], gen.mlp[2]
    h = first(z[:, :4])
    torch.testing.assert_close(out.text, second(h * torch.sigmoid(1.702 * h)))
