"""Paper recipes carry the reference scripts' per-dataset hyperparameters (values read in the reference repos)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# HiDe-Prompt's training_scripts/train_{cifar100,imr,cub}_*.sh: --reg 0.1 / 0.5 / 0.01 (every backbone); IT-Prompt
# takes HiDe's regulariser, so its recipes follow the same per-dataset value.
@pytest.mark.parametrize("method", ["hide", "itprompt"])
@pytest.mark.parametrize(("dataset", "reg"), [("cifar100", 0.1), ("imagenetr", 0.5), ("cub", 0.01)])
def test_hide_contrastive_regulariser_per_dataset(method: str, dataset: str, reg: float) -> None:
    cfg = load_config(CONFIGS / f"{method}_{dataset}_vitb16.yaml")
    assert cfg.method["reg"] == pytest.approx(reg)
