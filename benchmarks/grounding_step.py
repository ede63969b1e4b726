"""Grounding (REC) train step and evaluation throughput of the detector methods, beside the frozen-tower floor (JSON).

    python benchmarks/grounding_step.py                                  # vlprompt-tiny, batch 16, CPU
    python benchmarks/grounding_step.py --model ViT-B-16 --batch 16 --device cuda --autocast bf16 --out g.json

The **floor** is what no prompt method can avoid: the frozen towers on the same tokens as LPI (N prompt tokens
inserted after the first token of each tower, the detector's heads on the patches) and the backward pass to the
prompt tensors, with nothing else (no per-layer interaction, no lock-step loop, no extra loss terms). Each method's
train step is forward, loss, backward and AdamW on its trainable parameters; evaluation is ``predict`` (top-10 boxes)
on the same batch, routed by the image for the continual methods (keys fitted on the batch). Seconds are medians
over ``--repeats``; ``ratio_to_floor`` is the step time over the floor's. Backbones are random-initialised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import emit, environment, median_seconds, peak_memory_mb

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.backbone.detector import Detector
from vlprompt.methods import build_method
from vlprompt.methods.grounding import rec_loss

EXPRESSION = "the small red star left of the blue circle"


def floor_step(detector: Detector, images: torch.Tensor, tokens: torch.Tensor, n: int, depth: int):
    """Forward through the frozen towers with N inserted prompt tokens (+ deep adds) and backward to them."""
    b = detector.backbone
    pv = torch.zeros(depth, n, b.vision_width, device=images.device, requires_grad=True)
    pt = torch.zeros(depth, n, b.text_width, device=images.device, requires_grad=True)
    targets = torch.tensor([[0.5, 0.5, 0.2, 0.2]], device=images.device).expand(len(images), -1)

    def step() -> None:
        vplan = PromptPlan(insert=pv[0], add={i: pv[i] for i in range(1, depth)})
        tplan = PromptPlan(insert=pt[0], add={i: pt[i] for i in range(1, depth)})
        out = detector(images, tokens[:, None], vplan, tplan)
        loss, _, _ = rec_loss(out.logits[..., 0], out.boxes, targets)
        loss.backward()
        pv.grad = pt.grad = None

    return step


def method_step(method, images: torch.Tensor, tokens: torch.Tensor):
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None
    targets = torch.tensor([[0.5, 0.5, 0.2, 0.2]], device=images.device).expand(len(images), -1)

    def step() -> None:
        loss = method(images, tokens, targets)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vlprompt-tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--methods", default="floor,zeroshot_ground,lpi_ground,lpi_ground_no_interaction")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone(args.model, pretrained=None, device=device)
    depth = min(9, backbone.vision.num_layers, backbone.text.num_layers)
    images = torch.randn(args.batch, 3, backbone.image_size, backbone.image_size, device=device)
    tokens = backbone.tokenize([EXPRESSION] * args.batch).to(device)
    sizes = torch.tensor([[640, 480]] * args.batch)
    sections = {
        "zeroshot_ground": {"name": "zeroshot_ground"},
        "lpi_ground": {"name": "lpi_ground", "num_tasks": 2, "depth": depth, "layers": 9},
        "lpi_ground_no_interaction": {"name": "lpi_ground", "num_tasks": 2, "depth": depth, "interact": False},
    }
    results: dict[str, dict[str, float]] = {}
    for name in args.methods.split(","):
        torch.manual_seed(0)
        if name == "floor":
            detector = Detector(backbone)
            with ctx:
                seconds = median_seconds(floor_step(detector, images, tokens, 16, depth), args.repeats)
            results[name] = {"train_step_s": round(seconds, 4), "train_samples_per_s": round(args.batch / seconds, 2)}
            continue
        method = build_method(sections[name], backbone).to(device)
        if getattr(method, "uses_keys", False):
            feats = method.frozen_image_features(images)
            for t in range(method.num_tasks):
                method.fit_keys(t, feats)
            method.begin_task(method.num_tasks - 1)
        with ctx:
            step_s = median_seconds(method_step(method, images, tokens), args.repeats)
            eval_s = median_seconds(lambda m=method: m.predict(images, tokens, sizes, k=10), args.repeats)
        results[name] = {
            "train_step_s": round(step_s, 4),
            "train_samples_per_s": round(args.batch / step_s, 2),
            "eval_s": round(eval_s, 4),
            "eval_samples_per_s": round(args.batch / eval_s, 2),
            "trainable": sum(p.numel() for p in method.parameters() if p.requires_grad),
        }
    if "floor" in results:
        for name, r in results.items():
            if name != "floor":
                r["ratio_to_floor"] = round(r["train_step_s"] / results["floor"]["train_step_s"], 3)
    emit(
        {
            "benchmark": "grounding_step",
            "model": args.model,
            "batch": args.batch,
            "depth": depth,
            "autocast": args.autocast,
            **environment(device),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
