"""TPT / classification-TTA invariants that a one-line change would break (issue 14, mutation testing): which
views are kept on entropy ties, unit image features, the logit scale, the class prompts' length, what each variant
encodes and when (spec rlcf.md section 6: class features fixed in the encoder variant, views encoded once in the
prompt variant, step 0 reusing the selection pass, the prediction on the centre view alone), the "before" baseline,
the label space, and which context checkpoints load."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlprompt.backbone import load_backbone
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.tpt import confident_views

CLASSES = ["red square", "blue circle", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


def _fresh():
    """A backbone of its own (the encoder variant makes the image tower trainable)."""
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


def _method(backbone, tune: str = "prompt", **options):
    method = build_method({"name": "tpt", "tune": tune, **options}, backbone)
    method.set_classes(CLASSES)
    return method


def _views(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


class Calls:
    """Counts text-tower runs and records the batch size of every image-tower run."""

    def __init__(self, backbone) -> None:
        self.text = 0
        self.images: list[int] = []
        self.handles = [
            backbone.text.register_forward_hook(lambda m, args, out: self._text()),
            backbone.vision.register_forward_hook(lambda m, args, out: self.images.append(args[0].shape[0])),
        ]

    def _text(self) -> None:
        self.text += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---- selection ------------------------------------------------------------------------------------------------


def test_confident_views_keep_the_earliest_views_on_entropy_ties():
    """64 views, 10%: three clearly confident views, then ties broken by view index (view 0 = the centre crop)."""
    flat = torch.tensor([1.0, 0.5, 0.0, -0.5])
    logits = flat.repeat(64, 1)  # identical rows: exactly tied entropies
    for i, sharp in ((50, 8.0), (20, 6.0), (60, 4.0)):
        logits[i] = flat * sharp
    assert confident_views(logits, 0.1).tolist() == [50, 20, 60, 0, 1, 2]
    assert confident_views(flat.repeat(64, 1), 0.1).tolist() == [0, 1, 2, 3, 4, 5]


# ---- features and logits --------------------------------------------------------------------------------------


def test_view_features_are_unit_rows_of_the_image_tower(tiny):
    method = _method(tiny)
    views = _views(4, tiny.image_size)
    with torch.no_grad():
        feats = method.encode_views(views)
        want = F.normalize(tiny.encode_image(views), dim=-1)
    assert feats.shape == (4, tiny.embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(feats, want, atol=1e-6, rtol=1e-5)


def test_logits_are_100_cosines_by_default_and_the_backbone_scale_at_0(tiny):
    assert float(tiny.logit_scale) == pytest.approx(1 / 0.07, rel=1e-4)  # not 100: the two cases differ
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(3, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    default = _method(tiny)
    assert float(default.scale) == 100.0  # TPT's Z = 100 cos
    torch.testing.assert_close(default.logits(a, b), 100 * a @ b.t())
    own = _method(tiny, logit_scale=0.0)
    assert float(own.scale) == pytest.approx(1 / 0.07, rel=1e-4)
    torch.testing.assert_close(own.logits(a, b), (a @ b.t()) / 0.07, atol=1e-4, rtol=1e-4)


def test_class_prompts_stop_at_their_end_of_text_unless_truncation_is_off(tiny):
    """By default the text tower runs up to the longest prompt's end-of-text; ``truncate_text = False`` runs the
    full context like the reference (the benchmarks replay it)."""
    method = _method(tiny)
    lengths: list[int] = []
    hook = tiny.text.src.ln_final.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        assert method.truncate_text is True
        short = method.text_features()
        end = int(tiny.text.pool_positions(method.class_tokens).max()) + 1
        assert lengths == [end] and end < tiny.text.context_length
        method.truncate_text = False
        full = method.text_features()
        assert lengths == [end, tiny.text.context_length]
    finally:
        hook.remove()
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


# ---- what each variant encodes, and when ---------------------------------------------------------------------


def test_prompt_variant_encodes_views_once_and_reuses_the_selection_pass_at_step_0(tiny):
    method = _method(tiny)
    views = _views(8, tiny.image_size)
    calls = Calls(tiny)
    try:
        ep = method.begin(views, keep=0.25)
        assert (calls.text, calls.images) == (1, [8])  # one selection pass over all views
        loss = method.loss(ep, 0)
        assert (calls.text, calls.images) == (1, [8])  # step 0 reuses it, graph included
        loss.backward()
        assert method.context.ctx.grad is not None and method.context.ctx.grad.abs().sum() > 0
        method.loss(ep, 1)
        assert (calls.text, calls.images) == (2, [8])  # later steps: the class prompts again, no image
        method.predict(ep)
        assert (calls.text, calls.images) == (3, [8])  # the frozen image tower is never run again
    finally:
        calls.remove()


def test_encoder_variant_fixes_class_features_and_predicts_on_the_centre_view_alone():
    backbone = _fresh()
    calls = Calls(backbone)
    try:
        method = _method(backbone, tune="encoder")
        assert calls.text == 1  # set_classes computes the class features, once per class list
        ep = method.begin(_views(8, backbone.image_size), keep=0.25)
        method.loss(ep, 0).backward()
        method.loss(ep, 1)
        method.predict(ep)
        assert calls.text == 1
        assert calls.images == [8, 2, 2, 1]  # selection on all views, the 2 selected per step, the centre view
    finally:
        calls.remove()


@pytest.mark.parametrize("tune", ["prompt", "encoder"])
def test_before_is_the_centre_views_prediction_at_the_start(tune):
    backbone = _fresh()
    method = _method(backbone, tune=tune)
    views = _views(8, backbone.image_size)
    views[1] = views[0].flip(-1).roll(7, -2)  # another view of the same kind, clearly other logits
    with torch.no_grad():
        every = method.logits(method.encode_views(views), method.class_features())
    ep = method.begin(views, keep=0.25)
    assert ep.before is not None and ep.before.dtype == torch.float32
    torch.testing.assert_close(ep.before, every[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(method.predict(ep), ep.before, atol=1e-4, rtol=1e-5)  # nothing adapted yet
    assert (every[1] - every[0]).abs().max() > 0.05


# ---- label space ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tune", ["prompt", "encoder"])
def test_the_label_space_is_what_set_classes_gave_and_nothing_runs_before_it(tune):
    backbone = _fresh()
    method = build_method({"name": "tpt", "tune": tune}, backbone)
    assert method.class_names == []
    views = _views(4, backbone.image_size)
    with pytest.raises(RuntimeError, match="set_classes"):
        method.begin(views, keep=0.25)
    with pytest.raises(RuntimeError, match="set_classes"):
        method.class_features()
    names = list(CLASSES)
    method.set_classes(names)
    names.append("purple hexagon")
    assert method.class_names == CLASSES  # a copy: the label space the logits' columns follow
    assert method.class_features().shape == (len(CLASSES), backbone.embed_dim)


# ---- context checkpoints --------------------------------------------------------------------------------------


def test_a_flat_pth_context_loads_and_a_bare_tensor_is_a_config_error(tiny, tmp_path: Path):
    ctx = torch.randn(4, tiny.text_width)
    torch.save({"prompt_learner.ctx": ctx, "prompt_learner.token_prefix": torch.zeros(1)}, tmp_path / "flat.pth")
    method = build_method({"name": "tpt", "ctx_load": str(tmp_path / "flat.pth")}, tiny)
    assert torch.equal(method.context.ctx.data, ctx)
    torch.save(ctx, tmp_path / "bare.pth")
    with pytest.raises(ConfigError, match="no single context tensor"):
        build_method({"name": "tpt", "ctx_load": str(tmp_path / "bare.pth")}, tiny)


def test_a_safetensors_context_is_read_without_torch_load(tiny, tmp_path: Path, monkeypatch):
    """torch.load reads .safetensors only in recent releases; older supported ones (>= 2.6) fail on it."""
    ctx = torch.randn(4, tiny.text_width)
    save_file({"context.ctx": ctx}, str(tmp_path / "trainable.safetensors"))

    def old_torch_load(*args, **kwargs):
        raise pickle.UnpicklingError("invalid load key, '\\x10'.")

    monkeypatch.setattr(torch, "load", old_torch_load)
    method = build_method({"name": "tpt", "ctx_load": str(tmp_path / "trainable.safetensors")}, tiny)
    assert torch.equal(method.context.ctx.data, ctx)
