"""DGL as a method: parameter counts from the recipes, invariants of spec section 10, training touches prompts only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlprompt
from vlprompt.cli.main import main
from vlprompt.methods import build_method

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("config", "trainable", "frozen"),
    [("dgl_msrvtt_vitb32_linear.yaml", 827_392, 151_277_313), ("dgl_msrvtt_vitb16_transformer.yaml", 9_575_168,
                                                                 149_620_737)],
)  # fmt: skip
def test_recipe_parameter_counts(config: str, trainable: int, frozen: int, capsys) -> None:
    assert main(["params", str(CONFIGS / config), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"trainable": trainable, "total": trainable + frozen}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlprompt-tiny", pretrained=None).eval()


def _dgl(tiny, **options):
    torch.manual_seed(1)
    return build_method({"name": "dgl", "frames": 3, **options}, tiny).eval()


@pytest.mark.parametrize("latent", ["linear", "transformer"])
@pytest.mark.parametrize("embedding", ["frame_mean", "global_prompt0", "global_mean", "global_and_frame_mean"])
def test_video_embedding_does_not_depend_on_batch(tiny, latent: str, embedding: str) -> None:
    method = _dgl(tiny, latent=latent, video_embedding=embedding)
    video = torch.randn(3, 3, 3, 64, 64)
    with torch.no_grad():
        batch = method.encode_video(video)
        single = method.encode_video(video[2:])
    assert batch.shape == (3, tiny.embed_dim)
    assert torch.allclose(batch[2:], single, atol=1e-5)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_postfix_modes(tiny) -> None:
    method = _dgl(tiny, latent="linear", postfix="before_eot")
    tokens = method.tokenize(["a red star moves left", "a blue circle grows"])
    with torch.no_grad():
        before = method.encode_text(tokens)
        method.prompts.postfix_proj.weight.normal_()
        changed = method.encode_text(tokens)
        method.options.postfix = "inert"
        inert = method.encode_text(tokens)
        method.prompts.postfix_proj.weight.normal_()
        inert_again = method.encode_text(tokens)
    assert not torch.allclose(before, changed, atol=1e-4)  # effective before end-of-text
    assert torch.allclose(inert, inert_again)  # the reference's postfix is dead under the causal mask


def test_linear_variant_is_blind_to_frame_order_transformer_is_not(tiny) -> None:
    video = torch.randn(1, 3, 3, 64, 64)
    reversed_ = video.flip(1)
    with torch.no_grad():
        linear = _dgl(tiny, latent="linear")
        assert torch.allclose(linear.encode_video(video), linear.encode_video(reversed_), atol=1e-5)
        transformer = _dgl(tiny, latent="transformer")
        assert not torch.allclose(transformer.encode_video(video), transformer.encode_video(reversed_), atol=1e-4)


def test_training_step_updates_prompts_only(tiny) -> None:
    method = _dgl(tiny, latent="transformer").train()
    frozen = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    loss = method(torch.randn(2, 3, 3, 64, 64), method.tokenize(["a red star", "two green hearts"]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is not None for p in method.trainable_parameters())


def test_bad_options(tiny) -> None:
    with pytest.raises(ValueError, match="latent"):
        build_method({"name": "dgl", "latent": "mlp"}, tiny)
    with pytest.raises(ValueError, match="video_embedding"):
        build_method({"name": "dgl", "video_embedding": "cls"}, tiny)


def test_max_words_truncates_keeping_end_of_text(tiny) -> None:
    method = _dgl(tiny, latent="linear")
    method.max_words = 8
    tokens = method.tokenize(["a large red star left of a small blue circle above a green square"])
    assert tokens.shape == (1, 8)
    assert int(tokens[0].argmax()) == 7  # end-of-text at max_words - 1 (spec 10.6)
    with torch.no_grad():
        assert method.encode_text(tokens).shape == (1, tiny.embed_dim)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
def test_official_checkpoint_keys_round_trip(tiny, latent: str, tmp_path: Path) -> None:
    from vlprompt.core.checkpoint import load_reference_checkpoint
    from vlprompt.errors import ConfigError
    from vlprompt.methods.dgl import to_reference_state_dict

    source = _dgl(tiny, latent=latent)
    official = {"module." + k: v.clone() for k, v in to_reference_state_dict(source).items()}
    # an official file also holds the frozen CLIP; those tensors must be ignored
    official["module.clip.visual.conv1.weight"] = torch.zeros(1)
    spec_keys = {  # spec section 9.14
        "linear": ["visual_prompt_embedding", "prefix_text_prompt_proj_layer.weight",
                   "postfix_text_prompt_proj_layer.bias", "visual.prompt_embeddings"],
        "transformer": ["unified_prompt_embedding.weight", "PromptTransformer.resblocks.0.attn.in_proj_weight",
                        "unified_prompt_mlp.c_fc.weight", "unified_prompt_mlp.c_proj.bias",
                        "visual.prompt_embeddings"],
    }  # fmt: skip
    assert {f"module.clip.{k}" for k in spec_keys[latent]} <= set(official)
    assert len(official) - 1 == len(source.trainable_state_dict())
    torch.save(official, tmp_path / "dgl.pth")
    torch.manual_seed(5)
    target = build_method({"name": "dgl", "frames": 3, "latent": latent}, tiny)
    assert not torch.equal(target.prompts.global_prompts, source.prompts.global_prompts)
    load_reference_checkpoint(tmp_path / "dgl.pth", target)
    for name, tensor in source.trainable_state_dict().items():
        assert torch.equal(target.trainable_state_dict()[name], tensor), name
    other = "transformer" if latent == "linear" else "linear"
    with pytest.raises(ConfigError, match=f"not a DGL-{other} checkpoint"):
        load_reference_checkpoint(tmp_path / "dgl.pth", build_method({"name": "dgl", "frames": 3, "latent": other},
                                                                      tiny))  # fmt: skip
    with pytest.raises(ConfigError, match="not found"):
        load_reference_checkpoint(tmp_path / "missing.pth", target)


def _official_file(tiny, tmp_path: Path, latent: str = "linear") -> tuple[Path, dict[str, torch.Tensor]]:
    """An official-layout checkpoint of a random DGL (``module.clip.*`` keys, as the reference saves it)."""
    from vlprompt.methods.dgl import to_reference_state_dict

    source = _dgl(tiny, latent=latent)
    path = tmp_path / "dgl_official.pth"
    torch.save({"module." + k: v.clone() for k, v in to_reference_state_dict(source).items()}, path)
    return path, source.trainable_state_dict()


def test_every_dgl_recipe_follows_a_reference_checkpoint() -> None:
    """The recipes leave both behaviour options on ``auto``: the paper's without a reference checkpoint, the
    reference code's (the one its checkpoints and published numbers come from) with one."""
    from vlprompt.config import load_config
    from vlprompt.methods.build import method_options
    from vlprompt.methods.dgl import effective_behaviour

    recipes = sorted(CONFIGS.glob("dgl_*.yaml"))
    assert len(recipes) == 7
    for recipe in recipes:
        for overrides, expected in (
            ([], ("frame_mean", "before_eot")),
            (["method.reference_checkpoint=dgl.pth"], ("global_prompt0", "inert")),
        ):
            _, options = method_options(dict(load_config(recipe, overrides).method))
            got = (effective_behaviour(options, "video_embedding"), effective_behaviour(options, "postfix"))
            assert got == expected, (recipe.name, overrides)


def test_reference_checkpoint_selects_the_reference_behaviour(tiny, tmp_path: Path, caplog) -> None:
    from vlprompt.config import load_config
    from vlprompt.core.factory import build_model

    path, weights = _official_file(tiny, tmp_path)
    cfg = load_config(None, ["backbone.pretrained=null", "data.num_frames=3", "method.name=dgl",
                             "method.latent=linear", f"method.reference_checkpoint={path}"])  # fmt: skip
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="vlprompt.methods"):
        method = build_model(cfg, torch.device("cpu")).eval()
    assert "video_embedding=global_prompt0, postfix=inert" in caplog.text
    assert (method.video_embedding, method.postfix) == ("global_prompt0", "inert")
    # the embeddings are those of the reference behaviour with the checkpoint's weights, not the paper's
    explicit = build_method({"name": "dgl", "frames": 3, "latent": "linear", "video_embedding": "global_prompt0",
                             "postfix": "inert"}, method.backbone).eval()  # fmt: skip
    paper = build_method({"name": "dgl", "frames": 3, "latent": "linear"}, method.backbone).eval()
    for other in (explicit, paper):
        other.load_state_dict(weights, strict=False)
    torch.manual_seed(2)
    video, tokens = torch.randn(2, 3, 3, 64, 64), method.tokenize(["a red star moves left", "a blue circle grows"])
    with torch.no_grad():
        ours = method.encode_video(video), method.encode_text(tokens)
        torch.testing.assert_close(ours[0], explicit.encode_video(video))
        torch.testing.assert_close(ours[1], explicit.encode_text(tokens))
        assert not torch.allclose(ours[0], paper.encode_video(video), atol=1e-3)
        assert not torch.allclose(ours[1], paper.encode_text(tokens), atol=1e-3)
    assert not method.plans().text.suffix  # inert: no postfix prompt before end-of-text


def test_explicit_setting_is_kept_with_a_warning_under_a_reference_checkpoint(tiny, caplog) -> None:
    with caplog.at_level("WARNING", logger="vlprompt.methods"):
        method = _dgl(tiny, latent="linear", video_embedding="frame_mean", reference_checkpoint="dgl.pth")
    assert (method.video_embedding, method.postfix) == ("frame_mean", "inert")  # postfix: auto -> reference
    assert "postfix=inert" in caplog.text
    assert "video_embedding=frame_mean set explicitly" in caplog.text and "method.video_embedding=auto" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlprompt.methods"):
        plain = _dgl(tiny, latent="linear")
    assert (plain.video_embedding, plain.postfix) == ("frame_mean", "before_eot") and not caplog.text
    assert plain.plans().text.suffix  # before_eot: the postfix prompts reach the text embedding
