"""How distinct the embedded world's continual tasks are to a frozen CLIP: task-routing accuracy (JSON on stdout).

    python benchmarks/world_routing.py --world WORLD [--model vlprompt-tiny] [--keys 5] [--out FILE]
    python benchmarks/world_routing.py --size default --seed 0     # builds the world in a temporary folder

For every test image of the continual retrieval sequence (and of the grounding split, when the world has one) the
task is predicted from the frozen model's L2-normalised image features, two ways:

* **1-NN**: the super-category of the nearest training image (cosine similarity);
* **K-means routing**: S-Prompts/LPI's router (:class:`vlprompt.methods.routing.KMeansRouter`, ``--keys`` centres
  per task on the training features, L1 distance), with every task seen, as after the last task.

Text routing (the same two rules on caption features) is reported beside it. Chance is 1 / number of tasks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import emit, environment
from PIL import Image

import vlprompt
from vlprompt.data.continual import read_tasks_file
from vlprompt.data.grounding import read_mdetr_refexp
from vlprompt.data.json_files import read_json
from vlprompt.data.world import build_world
from vlprompt.data.world import layout as L
from vlprompt.methods.routing import KMeansRouter


@torch.no_grad()
def image_features(backbone: Any, root: Path, paths: Sequence[str], batch: int = 256) -> torch.Tensor:
    """Normalised frozen image features of the images at ``paths`` (relative to ``root``)."""
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([backbone.preprocess_val(Image.open(root / p).convert("RGB")) for p in paths[i : i + batch]])
        out.append(backbone.encode_image(x, normalize=True).cpu())
    return torch.cat(out)


@torch.no_grad()
def text_features(backbone: Any, texts: Sequence[str], batch: int = 512) -> torch.Tensor:
    """Normalised frozen text features."""
    return torch.cat([backbone.encode_text(list(texts[i : i + batch]), normalize=True).cpu()
                      for i in range(0, len(texts), batch)])  # fmt: skip


def routing_scores(
    train: torch.Tensor, train_tasks: torch.Tensor, test: torch.Tensor, test_tasks: torch.Tensor, keys: int
) -> dict[str, Any]:
    """1-NN and K-means routing accuracy (percent), overall and per task, of ``test`` against ``train``."""
    num_tasks = int(train_tasks.max()) + 1
    nearest = train_tasks[(test @ train.T).argmax(dim=1)]
    router = KMeansRouter(num_tasks, train.shape[1], keys)
    for t in range(num_tasks):
        router.fit_task(t, train[train_tasks == t], seed=0)
    routed = router.route(test, num_tasks)

    def acc(pred: torch.Tensor) -> dict[str, Any]:
        per_task = [round(100.0 * float((pred[test_tasks == t] == t).float().mean()), 2) for t in range(num_tasks)]
        return {"accuracy": round(100.0 * float((pred == test_tasks).float().mean()), 2), "per_task": per_task}

    return {"1nn": acc(nearest), "kmeans": acc(routed), "chance": round(100.0 / num_tasks, 2),
            "train_items": len(train), "test_items": len(test)}  # fmt: skip


def _task_index(order: list[int]) -> dict[int, int]:
    return {c: t for t, c in enumerate(order)}


def continual_routing(backbone: Any, world: Path, keys: int) -> dict[str, Any]:
    """Routing on the continual retrieval sequence: training images/captions vs. test images/captions."""
    order = read_json(L.continual_tasks_file(world), "continual task file")["order"]
    task_of = _task_index(order)
    train = read_json(L.continual_file(world, "train"), "continual train file")
    test = read_json(L.continual_file(world, "test"), "continual test file")
    train_images = list(dict.fromkeys(r["image"] for r in train))
    image_task = {r["image"]: task_of[r["category"]] for r in train}
    tr_img = image_features(backbone, world, train_images)
    te_img = image_features(backbone, world, [r["image"] for r in test])
    tr_tasks = torch.tensor([image_task[p] for p in train_images])
    te_tasks = torch.tensor([task_of[r["category"]] for r in test])
    test_caps = [c for r in test for c in r["caption"]]
    te_cap_tasks = torch.tensor([task_of[r["category"]] for r in test for _ in r["caption"]])
    return {
        "image": routing_scores(tr_img, tr_tasks, te_img, te_tasks, keys),
        "text": routing_scores(text_features(backbone, [r["caption"] for r in train]),
                               torch.tensor([task_of[r["category"]] for r in train]),
                               text_features(backbone, test_caps), te_cap_tasks, keys),
    }  # fmt: skip


def grounding_routing(backbone: Any, world: Path, keys: int) -> dict[str, Any] | None:
    """Routing on the grounding split (task = the target's super-category), clean and shifted test images; None
    for a world without one. Read with the real MDETR reader and the world's task sequence."""
    files = L.grounding_files(world)
    if not files["train"].is_file():
        return None
    tasks = read_tasks_file(L.continual_tasks_file(world))

    def load(path: Path) -> tuple[list[str], torch.Tensor]:
        # one image entry per expression, and all targets of a scene share its task: keep each picture once
        first = {}
        for s in read_mdetr_refexp(path, tasks=tasks):
            first.setdefault(s.image, s.task)
        return list(first), torch.tensor(list(first.values()))

    tr_paths, tr_tasks = load(files["train"])
    tr = image_features(backbone, world, tr_paths)
    out = {}
    for name, path in files.items():
        if name.startswith("test"):
            paths, te_tasks = load(path)
            out[name] = routing_scores(tr, tr_tasks, image_features(backbone, world, paths), te_tasks, keys)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=None, help="a built world (default: build one in a temp dir)")
    parser.add_argument("--size", default="default", help="world size to build when --world is not given")
    parser.add_argument("--seed", type=int, default=0, help="world seed to build when --world is not given")
    parser.add_argument("--model", default="vlprompt-tiny", help="an embedded model (its shipped weights)")
    parser.add_argument("--keys", type=int, default=5, help="K-means centres per task (S-Prompts and LPI: 5)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone(args.model, pretrained="world").eval()
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        built = None
        if world is None:
            world = Path(tmp) / "world"
            built = build_world(world, seed=args.seed, size=args.size, workers=2)
        manifest = read_json(L.manifest_file(world), "world manifest")
        start = time.perf_counter()
        report = {
            "benchmark": "world_routing",
            "model": args.model,
            "world": {k: manifest.get(k) for k in ("version", "seed", "size")},
            "world_build_seconds": built["seconds"] if built else None,
            "keys_per_task": args.keys,
            **environment(backbone.device),
            "continual": continual_routing(backbone, world, args.keys),
            "grounding": grounding_routing(backbone, world, args.keys),
        }
        report["seconds"] = round(time.perf_counter() - start, 1)
    emit(report, args.out)


if __name__ == "__main__":
    main()
