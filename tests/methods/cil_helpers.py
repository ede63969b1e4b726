"""A tiny class-incremental setting for method tests: random-init tiny CLIP, 3 tasks x 2 classes, a few images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlprompt.backbone import load_backbone
from vlprompt.config import load_config
from vlprompt.data.cil import ClassSplit, LabeledImages
from vlprompt.methods import build_method
from vlprompt.methods.cil import ClassIncrementalMethod
from vlprompt.runners.cil import ClassIncrementalLearner, class_text_anchors

NAMES = ["red square", "green circle", "blue triangle", "yellow star", "purple cross", "orange heart"]
SMALL = {
    "itprompt": {
        "layers": [0, 1],
        "length": 2,
        "tii_epochs": 2,
        "centroids": 2,
        "align_epochs": 2,
        "align_samples": 4,
    },
    "hide_prompt": {
        "layers": [0, 1],
        "length": 2,
        "tii_epochs": 2,
        "centroids": 2,
        "align_epochs": 2,
        "align_samples": 4,
    },  # fmt: skip
    "l2p_cil": {"pool_size": 4, "length": 2, "top_k": 2, "layers": [0]},
    "dualprompt": {"g_layers": [0], "e_layers": [1, 2], "g_length": 2, "e_length": 2},
    "coda_prompt": {"pool_size": 6, "length": 2, "layers": [0, 1]},
    "zeroshot_cil": {},
}


@dataclass
class Tiny:
    method: ClassIncrementalMethod
    learner: ClassIncrementalLearner
    split: ClassSplit


def tiny_cil(name: str, per_class: int = 3, oracle: bool = True, **options) -> Tiny:
    """Method ``name`` (small options + ``options``) set up on 3 tasks of 2 classes of coloured noise images."""
    torch.manual_seed(0)
    backbone = load_backbone("vlprompt-tiny", None)
    method = build_method({"name": name, "num_tasks": 3, **SMALL[name], **options}, backbone)
    assert isinstance(method, ClassIncrementalMethod)
    split = ClassSplit(((0, 1), (2, 3), (4, 5)))
    method.setup(split.task_sizes, class_text_anchors(method, NAMES, ["a photo of a {}."]))
    rng = np.random.RandomState(0)

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = [c for c in range(6) for _ in range(n)]
        x = rng.randint(0, 60, (len(labels), 16, 16, 3)).astype(np.uint8)
        for i, c in enumerate(labels):  # a class-dependent colour, so there is something to learn
            x[i, :, :, c % 3] += 120 + 20 * (c // 3)
        return x, labels

    transform = backbone.preprocess_val
    train = LabeledImages(*images(per_class), transform)
    test = LabeledImages(*images(2), transform)
    cfg = load_config(None, ["train.epochs=1", "train.batch_size=4", "train.lr=0.01", "train.eval_batch_size=8",
                             "train.weight_decay=0.05",  # would move any frozen tensor handed to AdamW
                             "cil.train_transform=eval", f"cil.oracle_eval={str(oracle).lower()}"])  # fmt: skip
    return Tiny(method, ClassIncrementalLearner(cfg, method, train, train, test, split), split)


def backbone_state(method: ClassIncrementalMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}


class FixedLogits(nn.Module):
    """A stand-in TII head returning given class logits for every query (no parameters: nothing to train)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(query), -1)
