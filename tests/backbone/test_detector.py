"""The OWL-ViT-style detector: shapes, prompt tokens kept out of the patches, the box bias by hand, parity with
``transformers``' OWL-ViT / OWLv2 on random tiny configs, top-k order, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone.detector import Detector, box_bias, drop_inserted, rank_patches
from vlprompt.backbone.owlvit import load_owlvit, owl_to_open_clip
from vlprompt.errors import WeightsUnavailableError

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
EOT, VOCAB, CONTEXT = 99, 100, 16


@pytest.fixture(scope="module")
def detector() -> Detector:
    """The embedded tiny CLIP (64x64 input, 8x8 patches) with new heads, random init."""
    torch.manual_seed(0)
    return Detector(vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval().freeze()).eval()


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size)


def _tokens(det: Detector, texts: list[str]) -> torch.Tensor:
    return det.backbone.tokenize(texts)


# ---- shapes and prompt tokens --------------------------------------------------------------------------------------
def test_shapes_for_shared_and_per_image_queries(detector):
    shared = _tokens(detector, ["a red star", "a blue circle", "the left one"])
    out = detector(_images(), shared)
    assert detector.grid == (8, 8)
    assert out.logits.shape == (2, 64, 3) and out.boxes.shape == (2, 64, 4) and out.features.shape == (2, 64, 192)
    assert out.objectness is None
    assert bool(((out.boxes > 0) & (out.boxes < 1)).all())  # sigmoid: normalised cxcywh
    per_image = torch.stack([shared[:2], shared[1:]])  # [B=2, Q=2, L]
    out2 = detector(_images(), per_image)
    assert out2.logits.shape == (2, 64, 2)
    # image 1's second query is the shared list's third: the same logits as the shared call
    torch.testing.assert_close(out2.logits[1, :, 1], out.logits[1, :, 2], atol=ATOL, rtol=0)


def test_inserted_prompt_tokens_are_not_patches(detector):
    torch.manual_seed(2)
    plan = PromptPlan(insert=torch.randn(5, detector.backbone.vision_width))
    images = _images()
    feats = detector.patch_features(images, plan)
    assert feats.shape == (2, 64, 192)  # 1 class + 5 prompts + 64 patches -> 64 patches
    tokens = detector.backbone.vision(images, plan, return_tokens=True).tokens
    assert tokens.shape[1] == 1 + 5 + 64
    keep = torch.tensor([0, *range(6, 70)])  # class token, then the patches after the 5 prompt tokens
    ln = detector.backbone.vision.visual.ln_post(tokens[:, keep])
    expected = detector.layer_norm(ln[:, 1:] * ln[:, :1])
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)
    plain = detector.patch_features(images)
    assert (feats - plain).abs().max() > 1e-3  # the prompts act through attention


def test_replaced_tokens_stay_patches(detector):
    plan = PromptPlan(replace={1: torch.zeros(3, detector.backbone.vision_width)})
    assert detector.patch_features(_images(), plan).shape == (2, 64, 192)
    x = torch.arange(24.0).reshape(1, 6, 4)
    assert drop_inserted(x, plan) is x


def test_box_bias_matches_a_hand_computation():
    def inv(x: float) -> float:
        return math.log(x + 1e-4) - math.log1p(-x + 1e-4)

    bias = box_bias(2, 3)  # 2 rows, 3 columns, row-major
    assert bias.shape == (6, 4)
    for index, (row, col) in enumerate([(r, c) for r in range(2) for c in range(3)]):
        expected = [inv((col + 1) / 3), inv((row + 1) / 2), inv(1 / 3), inv(1 / 2)]
        torch.testing.assert_close(bias[index], torch.tensor(expected), atol=1e-5, rtol=1e-4)  # float32 near 1
    assert bias[5, 0].item() == pytest.approx(math.log(1.0001) - math.log(1e-4), rel=1e-4)  # corner 1 stays finite


def test_box_bias_is_cached_per_device(detector):
    first = detector.box_bias(torch.device("cpu"), torch.float32)
    assert detector.box_bias(torch.device("cpu"), torch.float32) is first
    torch.testing.assert_close(first, box_bias(8, 8))


def test_zero_box_head_predicts_the_patch_prior(detector):
    det = Detector(detector.backbone)
    torch.nn.init.zeros_(det.box_head.dense2.weight)
    torch.nn.init.zeros_(det.box_head.dense2.bias)
    boxes = det(_images(1), _tokens(det, ["x"])).boxes[0]
    row, col = 2, 5
    expected = torch.tensor([(col + 1) / 8, (row + 1) / 8, 1 / 8, 1 / 8])
    torch.testing.assert_close(boxes[row * 8 + col], expected, atol=2e-4, rtol=0)


def test_objectness_head_trains_on_detached_features(detector):
    det = Detector(detector.backbone, objectness=True)
    out = det(_images(), _tokens(det, ["x"]))
    assert out.objectness.shape == (2, 64)
    out.objectness.sum().backward()  # OWLv2: objectness learns without moving the features under it
    assert det.objectness_head.dense0.weight.grad is not None
    assert det.layer_norm.weight.grad is None


# ---- top-k -------------------------------------------------------------------------------------------------------
def test_rank_patches_orders_best_first_and_breaks_ties_by_lower_patch():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, -1.0]])
    boxes = torch.arange(20.0).reshape(1, 5, 4)
    top = rank_patches(scores, boxes, 3)
    assert top.patches.tolist() == [[0, 2, 3]]
    assert top.scores.tolist() == [[3.0, 3.0, 2.0]]
    assert top.boxes[0, 1].tolist() == [8.0, 9.0, 10.0, 11.0]
    assert rank_patches(scores, boxes, 10).patches.shape == (1, 5)  # k larger than the patches: all of them
    with pytest.raises(ValueError, match="k must be"):
        rank_patches(scores, boxes, 0)


def test_predict_returns_the_best_patches_of_each_expression(detector):
    images, tokens = _images(), _tokens(detector, ["a red star", "a blue circle"])
    top = detector.predict(images, tokens, k=10)
    out = detector(images, tokens[:, None])
    assert top.boxes.shape == (2, 10, 4) and top.scores.shape == (2, 10)
    assert bool((top.scores[:, :-1] >= top.scores[:, 1:]).all())
    logits = out.logits[..., 0]
    torch.testing.assert_close(top.scores, logits.gather(1, top.patches), atol=ATOL, rtol=0)
    torch.testing.assert_close(top.scores[:, 0], logits.max(dim=1).values, atol=ATOL, rtol=0)
    torch.testing.assert_close(top.boxes, out.boxes.gather(1, top.patches[..., None].expand(-1, -1, 4)))


# ---- errors ------------------------------------------------------------------------------------------------------
def test_wrong_image_size_is_a_clear_error(detector):
    with pytest.raises(ValueError, match=r"takes 64x64 images .* got 32x48"):
        detector(torch.zeros(1, 3, 32, 48), _tokens(detector, ["x"]))
    with pytest.raises(ValueError, match="one expression per image"):
        detector.predict(_images(), _tokens(detector, ["x"]))


# ---- parity with transformers ------------------------------------------------------------------------------------
def _owl(kind: str) -> torch.nn.Module:
    config_cls, model_cls = {
        "owlvit": (transformers.OwlViTConfig, transformers.OwlViTForObjectDetection),
        "owlv2": (transformers.Owlv2Config, transformers.Owlv2ForObjectDetection),
    }[kind]
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CONTEXT,
        vocab_size=VOCAB,
        bos_token_id=98,
        eos_token_id=EOT,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    torch.manual_seed(3)
    model = model_cls(config_cls(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():  # layer norms start at 1/0 and heads near 0: move every weight off its init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _queries(batch: int, per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B*Q, L]`` ending in EOT then 0-padding (one all-padding query: masked), and the attention mask."""
    torch.manual_seed(4)
    ids = torch.randint(1, EOT - 2, (batch * per_image, CONTEXT))
    lengths = torch.tensor([5, 9, 16, 3, 7, 12][: batch * per_image])
    for i, n in enumerate(lengths.tolist()):
        ids[i, n - 1], ids[i, n:] = EOT, 0
    ids[-1] = 0  # a padded query, as OWL-ViT's processor pads a short query list
    mask = (torch.arange(CONTEXT)[None] < lengths[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("kind", ["owlvit", "owlv2"])
def test_matches_transformers_logits_and_boxes(kind):
    model = _owl(kind)
    det = load_owlvit(model)
    assert (det.objectness_head is not None) == (kind == "owlv2")
    batch, per_image = 2, 3
    ids, mask = _queries(batch, per_image)
    torch.manual_seed(5)
    pixels = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        queries = ids.reshape(batch, per_image, CONTEXT)
        out = det(pixels, queries, query_mask=queries[..., 0] > 0)
    assert out.logits.shape == ref.logits.shape == (2, 16, 3)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.boxes, ref.pred_boxes, atol=ATOL, rtol=0)
    if kind == "owlv2":
        torch.testing.assert_close(out.objectness, ref.objectness_logits, atol=ATOL, rtol=0)
    assert ref.logits[..., :2].abs().max() > 1.0  # real, varied logits: the comparison is not between near-zeros


def test_loads_a_saved_folder_and_keeps_every_weight(tmp_path):
    model = _owl("owlvit")
    model.save_pretrained(tmp_path / "owl")
    det = load_owlvit(tmp_path / "owl")
    assert det.backbone.context_length == CONTEXT and det.image_size == (32, 32)
    assert not any(p.requires_grad for p in det.backbone.parameters())
    ids, mask = _queries(1, 2)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(input_ids=ids[:1], pixel_values=pixels, attention_mask=mask[:1])
        out = det(pixels, ids[:1])
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


def test_missing_checkpoint_and_bad_state_dicts_are_clear_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="could not load the OWL checkpoint .*nowhere"):
        load_owlvit(tmp_path / "nowhere")
    model = _owl("owlvit")
    sd = model.state_dict()
    with pytest.raises(WeightsUnavailableError, match="needs the checkpoint's config"):
        load_owlvit(sd)
    broken = {k: v for k, v in sd.items() if k != "owlvit.text_model.encoder.layers.1.self_attn.q_proj.weight"}
    with pytest.raises(WeightsUnavailableError, match="lacks tensor owlvit.text_model.encoder.layers.1"):
        load_owlvit(broken, model.config)
    with pytest.raises(WeightsUnavailableError, match="does not use: .*owlvit.extra"):
        owl_to_open_clip({**sd, "owlvit.extra": torch.zeros(1)}, 2, 2)
    with pytest.raises(WeightsUnavailableError, match="lacks head tensors"):
        load_owlvit({k: v for k, v in sd.items() if not k.startswith("box_head.dense2")}, model.config)
    with pytest.raises(WeightsUnavailableError, match="not an OWL"):
        owl_to_open_clip({"visual.proj": torch.zeros(1)}, 2, 2)


class _Planted:
    """Unpickling this touches ``marker``: a stand-in for code a copied checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_pickled_checkpoint_cannot_run_code(tmp_path):
    folder = tmp_path / "owl"
    _owl("owlvit").config.save_pretrained(folder)
    marker = tmp_path / "ran"
    torch.save({"owlvit.logit_scale": _Planted(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsUnavailableError, match="could not load the OWL checkpoint"):
        load_owlvit(folder)
    assert not marker.exists()
