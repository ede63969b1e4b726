"""The episodic TTA runner: bit-exact restore, order independence, momentum averaging, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from vlprompt.backbone import embedded_weights_path, load_backbone
from vlprompt.cli.main import main
from vlprompt.config import load_config
from vlprompt.methods import build_method
from vlprompt.methods.rlcf import RewardCLIP
from vlprompt.runners.tta import EpisodicState, SampleViews, make_optimizer, run_classification

CLASSES = ["red square", "blue circle", "green triangle", "yellow star", "purple heart"]
WORLD = Path(__file__).resolve().parents[2] / "configs" / "world"
needs_weights = pytest.mark.skipif(
    not embedded_weights_path("vlprompt-small").exists(), reason="embedded CLIP weights not shipped"
)


class RandomImages(Dataset):
    """Item i = (a random image tensor, label i): every sample is distinguishable by its label."""

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def _views(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(8, *image.shape, generator=generator) * 0.3
    noise[0] = 0
    return image.unsqueeze(0) + noise


def _method(tune: str):
    torch.manual_seed(0)
    method = build_method({"name": "rlcf", "tune": tune, "sample_k": 3}, load_backbone("vlprompt-tiny", None))
    torch.manual_seed(1)
    method.attach_reward(RewardCLIP([load_backbone("vlprompt-tiny", None)]))
    method.set_classes(CLASSES)
    return method


def _cfg(*overrides: str):
    return load_config(None, ["tta.steps=2", "tta.selection=0.25", "tta.lr=0.01", *overrides])


@pytest.mark.parametrize("tune", ["prompt", "encoder"])
def test_restore_is_bit_exact_after_n_samples(tune: str) -> None:
    method = _method(tune)
    trainable = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in method.named_parameters() if not p.requires_grad}
    out = run_classification(method, SampleViews(RandomImages(5), _views, seed=0), _cfg(), torch.device("cpu"))
    assert len(out.scores) == 5
    for name, p in method.named_parameters():
        assert torch.equal(p, (trainable if p.requires_grad else frozen)[name]), name


def test_episodic_predictions_do_not_depend_on_order_or_on_optimizer_history() -> None:
    method = _method("prompt")
    data = SampleViews(RandomImages(4), _views, seed=0)
    runs = []
    for seed in (0, 7):  # two different sample orders; the first sample of each sees a fresh optimizer
        out = run_classification(method, data, _cfg(f"seed={seed}"), torch.device("cpu"))
        runs.append(dict(zip(out.labels, out.scores)))
    assert list(runs[0]) != list(runs[1])  # really two orders
    assert all(torch.equal(runs[0][i], runs[1][i]) for i in runs[0])
    zero_shot = run_classification(method, data, _cfg("tta.steps=0"), torch.device("cpu"))
    assert any(not torch.equal(runs[0][i], s) for i, s in zip(zero_shot.labels, zero_shot.scores))  # it adapts


def test_restore_zeroes_the_optimizer_state_in_place() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([p], load_config(None, []).tta)
    state = EpisodicState([p], optimizer)
    p.grad = torch.ones(3)
    optimizer.step()
    buffers = [t for s in optimizer.state.values() for t in s.values()]
    assert any(t.abs().sum() > 0 for t in buffers)
    state.finish_sample()
    assert torch.equal(p.data, torch.ones(3)) and p.grad is None
    assert all(t.abs().sum() == 0 for t in buffers)
    assert [t for s in optimizer.state.values() for t in s.values()][0] is buffers[0]  # same tensors, zeroed


def _momentum_after(samples: int, m: float, every: int, weight: float, tuned: float = 3.0) -> torch.Tensor:
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    state = EpisodicState([p], torch.optim.AdamW([p]), momentum=m, every=every, weight=weight)
    for _ in range(samples):
        with torch.no_grad():
            p.fill_(tuned)  # what adaptation left behind
        state.finish_sample()
    return p.detach()


def test_momentum_average_moves_the_start_point_every_f_samples() -> None:
    m, f = 0.9, 4
    expected = 1.0 * m**f + 3.0 * (1 - m**f)
    assert torch.allclose(_momentum_after(f, m, f, 1.0), torch.full((2,), expected, dtype=torch.float64))
    assert torch.equal(_momentum_after(f - 1, m, f, 1.0), torch.ones(2, dtype=torch.float64))  # not yet
    assert torch.equal(_momentum_after(2 * f, 1.0, f, 1.0), torch.ones(2, dtype=torch.float64))  # m = 1: episodic
    assert torch.equal(_momentum_after(2 * f, m, f, 0.0), torch.ones(2, dtype=torch.float64))  # w = 0: episodic


@needs_weights
def test_tta_command_on_the_small_world(small_world: Path, tmp_path: Path, capsys) -> None:
    args = ["tta", str(WORLD / "tta_rlcf_t2i.yaml"), f"data.root={small_world}", f"out_dir={tmp_path}",
            "tta.max_samples=2", "tta.steps=1", "--json", "--quiet"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["samples"] == 2 and "t2i/R@1" in metrics and metrics["seconds_adapt_per_sample"] > 0
    # total = setup (gallery and reward features) + the per-sample loop; the old names are gone
    loop = metrics["seconds_adapt_per_sample"] * metrics["samples"]
    assert metrics["seconds_total"] == pytest.approx(metrics["seconds_setup"] + loop)
    assert metrics["seconds_setup"] > 0 and not {"seconds", "seconds_per_sample"} & set(metrics)
    assert json.loads((tmp_path / "tta_rlcf_t2i" / "metrics.json").read_text())["samples"] == 2


def test_tta_command_reports_bad_data_format(tmp_path: Path, capsys) -> None:
    args = ["tta", str(WORLD / "tta_tpt.yaml"), "data.format=coco", f"data.root={tmp_path}", f"out_dir={tmp_path}"]
    assert main(args) == 2
    assert "not a TTA classification format" in capsys.readouterr().err


@needs_weights
def test_demo_tta_section_on_the_small_world(small_world: Path, tmp_path: Path) -> None:
    from rich.console import Console

    from vlprompt.demo import SECTIONS

    ctx = {"out": tmp_path, "progress": False, "console": Console(quiet=True),
           "overrides": ["tta.max_samples=1", "tta.views=4"]}  # fmt: skip
    rows = SECTIONS["tta"](small_world, False, ctx)
    methods = ["zero-shot", "TPT", "RLCF (prompt)", "RLCF (encoder)", "zero-shot", "RLCF", "zero-shot", "RLCF"]
    assert [r.method for r in rows] == methods
    assert all(r.domain == "sketch" for r in rows) and len({r.section for r in rows}) == 3
    assert "acc@1" in rows[0].metrics and "ms/sample" in rows[3].metrics and "t2i/R@1" in rows[7].metrics
    assert rows[0].trainable == 0 and rows[3].trainable > rows[2].trainable > 0


RECIPES = sorted(
    [*WORLD.parent.glob("rlcf*.yaml"), *WORLD.parent.glob("tpt_*.yaml"), *WORLD.parent.glob("clip_zeroshot_*.yaml"),
     *WORLD.glob("tta_*.yaml")]
)  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_and_their_method_options_are_valid(recipe: Path) -> None:
    from vlprompt.methods import METHODS
    from vlprompt.options import options_from_dict

    cfg = load_config(recipe)
    section = dict(cfg.method)
    name = section.pop("name")
    options = options_from_dict(METHODS.get(name).Options, section, where=recipe.name)
    assert cfg.tta.steps >= 0 and (name != "rlcf" or options.sample_k == 3)


def test_captions_are_cleaned_as_the_reference_does() -> None:
    from vlprompt.runners.tta import clean_caption

    assert clean_caption('A Man (riding) a "horse"!  On the beach.') == "a man riding a horse on the beach"
    assert len(clean_caption(" ".join(["word"] * 80)).split()) == 50
