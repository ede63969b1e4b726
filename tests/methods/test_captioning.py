"""Captioning training loss: the teacher-forcing layouts (clean and the reference's quirks), ClipCap vs CapDec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbone.caption_helpers import tiny_captioner  # tests/ is on sys.path (rootdir-relative packages)
from vlprompt.backbone import load_backbone
from vlprompt.backbone.captioner import mapper_state_to_reference
from vlprompt.core.checkpoint import load_reference_checkpoint
from vlprompt.methods import list_methods
from vlprompt.methods.captioning import (
    CAPDEC_NOISE_VARIANCE,
    CapDec,
    CapDecOptions,
    Captioning,
    CaptioningOptions,
    caption_losses,
    noisy_embedding,
    teacher_forcing,
)

SHORT, LONG = "a dog", "a red square on a table"


def _full_logits(cap, prefix: torch.Tensor, rows: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every position of ``[prefix ; row]``, one caption at a time (no padding anywhere)."""
    out = []
    for i, row in enumerate(rows):
        embeds = torch.cat([prefix[i : i + 1], cap.lm.get_input_embeddings()(torch.tensor([row]))], dim=1)
        out.append(cap.lm(inputs_embeds=embeds).logits[0])
    return out


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_clean_loss_predicts_tokens_then_eos_after_bos_averaged_per_caption(kind: str) -> None:
    cap = tiny_captioner(kind)
    tok = cap.tokenizer
    prefix = cap.prefix(torch.randn(2, 16))
    losses = caption_losses(cap, prefix, teacher_forcing(tok, [SHORT, LONG]))
    lead = [] if tok.bos_id is None else [tok.bos_id]
    p = prefix.shape[1]
    for i, (text, logits) in enumerate(
        zip([SHORT, LONG], _full_logits(cap, prefix, [lead + t for t in tok.encode([SHORT, LONG])]))
    ):
        ids = tok.encode([text])[0]
        targets = torch.tensor(ids + [tok.eos_id])
        # the position before each target predicts it: the last input (BOS, or the last prefix slot without BOS)
        start = p + len(lead) - 1
        expected = F.cross_entropy(logits[start : start + len(targets)], targets)
        torch.testing.assert_close(losses[i], expected, rtol=1e-5, atol=1e-5)


def test_clean_loss_masks_pads_so_a_caption_scores_the_same_alone_and_batched() -> None:
    cap = tiny_captioner()
    prefix = cap.prefix(torch.randn(1, 16))
    alone = caption_losses(cap, prefix, teacher_forcing(cap.tokenizer, [SHORT]))
    batched = caption_losses(cap, prefix, teacher_forcing(cap.tokenizer, [SHORT, LONG]))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)
    forcing = teacher_forcing(cap.tokenizer, [SHORT, LONG])
    torch.testing.assert_close(forcing.weights.sum(1), torch.ones(2))


def test_reference_quirks_reproduce_the_tta_loss_bug() -> None:
    """RLCF's TTA loss: targets = the tokenizer output [BOS, tokens] padded with OPT's pad 1, CE with
    ignore_index=0 and reduction none, then .mean over the padded length: pads count, BOS is a target, no eos."""
    cap = tiny_captioner()
    tok = cap.tokenizer
    prefix = cap.prefix(torch.randn(1, 16)).expand(2, -1, -1)
    rows = [[tok.bos_id] + t for t in tok.encode([SHORT, LONG])]
    width = max(len(r) for r in rows)
    padded = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    embeds = torch.cat([prefix, cap.lm.get_input_embeddings()(padded)], dim=1)
    full_mask = torch.cat([torch.ones(2, prefix.shape[1], dtype=torch.long), mask], dim=1)
    logits = cap.lm(inputs_embeds=embeds, attention_mask=full_mask).logits[:, prefix.shape[1] - 1 : -1]
    ce = F.cross_entropy(logits.flatten(0, 1), padded.flatten(), ignore_index=0, reduction="none").view(2, -1)
    quirky = caption_losses(cap, prefix, teacher_forcing(tok, [SHORT, LONG], reference_quirks=True))
    torch.testing.assert_close(quirky, ce.mean(dim=-1), rtol=1e-5, atol=1e-5)
    alone = caption_losses(cap, prefix[:1], teacher_forcing(tok, [SHORT], reference_quirks=True))
    assert not torch.allclose(alone[0], quirky[0], atol=1e-3)  # the bug: a caption's loss depends on its batch


def test_reference_quirks_in_training_ignore_zero_pads_and_average_over_the_batch_tokens() -> None:
    """The reference's training: pads are 0 (ignored by ignore_index=0), one token-mean over the whole batch."""
    cap = tiny_captioner()
    tok = cap.tokenizer
    prefix = cap.prefix(torch.randn(2, 16))
    forcing = teacher_forcing(tok, [SHORT, LONG], reference_quirks=True, training=True)
    rows = [[tok.bos_id] + t for t in tok.encode([SHORT, LONG])]
    per_token = []
    for i, logits in enumerate(_full_logits(cap, prefix, rows)):
        per_token.append(F.cross_entropy(logits[prefix.shape[1] - 1 : -1], torch.tensor(rows[i]), reduction="none"))
    torch.testing.assert_close(
        caption_losses(cap, prefix, forcing).mean(), torch.cat(per_token).mean(), rtol=1e-5, atol=1e-5
    )


def test_noise_has_capdecs_variance_and_unit_norm() -> None:
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(400, 512, generator=g), dim=-1)
    y = noisy_embedding(x, CAPDEC_NOISE_VARIANCE, g)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(400))
    # |x + n|^2 ~ 1 + D * variance for unit x, so cos(y, x) ~ 1 / sqrt(1 + 512 * 0.016) = 0.33 (std: 0.12)
    cos = (x * y).sum(-1).mean()
    assert abs(cos.item() - (1 + 512 * CAPDEC_NOISE_VARIANCE) ** -0.5) < 0.03
    torch.testing.assert_close(noisy_embedding(3 * x, 0.0), x)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_backbone("vlprompt-tiny", None)


def _method(cls, options, clip):
    return cls(clip, options, captioner=tiny_captioner(clip_dim=clip.embed_dim))


def test_only_the_mapper_trains_and_gets_gradients(clip) -> None:
    m = _method(Captioning, CaptioningOptions(prefix_length=4), clip)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "captioner." + n for n, _ in m.captioner.named_parameters() if n.startswith("mapper.")
    }
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    m(images, m.tokenize([SHORT, LONG])).backward()
    assert all((p.grad is not None) == p.requires_grad for p in m.parameters())
    assert set(m.trainable_state_dict()) == {"captioner.mapper." + k for k in m.captioner.mapper.state_dict()}


def test_clipcap_reads_images_and_capdec_reads_only_the_caption_text(clip) -> None:
    clipcap = _method(Captioning, CaptioningOptions(prefix_length=4), clip)
    capdec = _method(CapDec, CapDecOptions(prefix_length=4), clip)
    assert (capdec.options.embedding, capdec.options.noise_variance) == ("text", CAPDEC_NOISE_VARIANCE)
    a, b = (
        torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    )
    batch = capdec.tokenize([SHORT, LONG])
    capdec.generator = torch.Generator().manual_seed(5)
    first = capdec(a, batch)
    capdec.generator = torch.Generator().manual_seed(5)
    torch.testing.assert_close(capdec(b, batch), first)  # other images, same loss
    assert not torch.allclose(clipcap(a, clipcap.tokenize([SHORT, LONG])), clipcap(b, clipcap.tokenize([SHORT, LONG])))


def test_registered_and_reference_checkpoint_loads_through_the_factory_path(clip, tmp_path) -> None:
    assert {"clipcap", "capdec", "rlcf_caption"} <= set(list_methods())
    source = _method(Captioning, CaptioningOptions(prefix_length=4), clip)
    torch.save({"state_dict": mapper_state_to_reference(source.captioner.mapper.state_dict())}, tmp_path / "m.pt")
    torch.manual_seed(7)
    target = Captioning(
        clip, CaptioningOptions(prefix_length=4), captioner=tiny_captioner(clip_dim=clip.embed_dim, seed=3)
    )
    load_reference_checkpoint(tmp_path / "m.pt", target)
    assert all(
        torch.equal(a, b) for a, b in zip(source.captioner.mapper.parameters(), target.captioner.mapper.parameters())
    )


def test_caption_batches_images(clip) -> None:
    m = _method(Captioning, CaptioningOptions(prefix_length=4, max_new_tokens=5, final_beams=2), clip)
    captions = m.caption(torch.randn(3, 3, clip.image_size, clip.image_size))
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
