"""LPI against golden outputs of the reference code (Kelvin-ywc/LPI, ``retrieval/``), on every run.

``tests/fixtures/golden/lpi.{npz,json}`` hold what the reference computed for a small seeded configuration
(``benchmarks/lpi_reference.py --record``): 5 of its COCO tasks, task 4 current, the release's depth 1. Checked:
the token ids of ``"X" * 16 + " " + caption + "."``, the training features, each weighted loss term and the
prompt gradients, the frozen routing-key features, the task each image and caption is routed to over given keys
(one query has a decoy key nearer in L2 but farther in L1), and the evaluation features under the routed tasks'
prompts. Ours is rebuilt from the same seed.
"""

from __future__ import annotations

import pytest
import torch

from .golden import assert_close, build_backbone, lpi_outputs, lpi_setup, read_fixture, routing_margin

META, REF = read_fixture("lpi")
#: fp32 across CPU kernels: measured ≤ 3.3e-7 on features and losses and ≤ 3.8e-6 (relative) on gradients,
#: under 1 and 2 threads, AVX512 and ATEN_CPU_CAPABILITY=default, OPENBLAS_CORETYPE Haswell and Prescott.
ATOL = 1e-5  # unit features and the loss terms (absolute)
GRAD_RTOL = 5e-5  # prompt gradients, relative to the largest entry of each


@pytest.fixture(scope="module")
def ours() -> dict[str, torch.Tensor]:
    method, images = lpi_setup(META, build_backbone(META["model_cfg"]))
    centres = torch.from_numpy(REF["centres_image"]), torch.from_numpy(REF["centres_text"])
    return lpi_outputs(method, images, META["captions"], *centres)


def test_lpi_text_is_the_references_string(ours) -> None:
    message = "the token ids differ from those of the reference's string 'X' * 16 + ' ' + caption + '.'"
    assert torch.equal(ours["tokens"], torch.from_numpy(REF["tokens"])), message


@pytest.mark.parametrize("key", ["image", "text", "loss", "loss_clip", "loss_align", "loss_task"])
def test_lpi_training_step_matches_the_reference_code(ours, key: str) -> None:
    assert_close(ours[key], REF[key], ATOL, key)


def test_lpi_gradients_reach_the_current_task_only_and_match(ours) -> None:
    recorded = sorted(k for k in REF if k.startswith("grad."))
    assert sorted(k for k in ours if k.startswith("grad.")) == recorded  # prompts.<task>.* of task 4 only
    for key in recorded:
        assert_close(ours[key], REF[key], GRAD_RTOL * float(abs(REF[key]).max()), key)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_lpi_routing_and_evaluation_match_the_reference_code(ours, modality: str) -> None:
    assert_close(ours[f"key_{modality}"], REF[f"key_{modality}"], ATOL, f"frozen {modality} key features")
    # the recorder planted keys near the queries: the nearest task wins by a clear margin, not by rounding
    assert routing_margin(ours[f"key_{modality}"], torch.from_numpy(REF[f"centres_{modality}"])) > 1e-2
    routes, recorded = ours[f"route_{modality}"].cpu(), torch.from_numpy(REF[f"route_{modality}"])
    assert torch.equal(routes, recorded), f"{modality} routes {routes.tolist()}, the reference's {recorded.tolist()}"
    assert_close(ours[f"eval_{modality}"], REF[f"eval_{modality}"], ATOL, f"{modality} evaluation features")
