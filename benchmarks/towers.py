"""Throughput of the promptable towers against open_clip's own encoders (JSON on stdout).

    python benchmarks/towers.py --model ViT-B-32 --batch 32 --precision fp32 [--device cuda]

Reports images/s and texts/s for open_clip's ``encode_image``/``encode_text`` and for vlprompt's towers
with an empty plan and with a VPT-style plan, so versions can be compared run to run.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import environment, median_seconds

import vlprompt
from vlprompt.backbone import PromptPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone(args.model, pretrained=None, device=device).eval()
    size = backbone.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokens = backbone.tokenize(["a large red star left of a small blue circle"] * args.batch)
    prompts = torch.randn(backbone.vision.num_layers, 8, backbone.vision_width, device=device)
    vpt = PromptPlan(insert=prompts[0], replace={i: prompts[i] for i in range(1, len(prompts))})
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    cases = {
        "open_clip.encode_image": lambda: backbone.model.encode_image(images),
        "tower.image": lambda: backbone.encode_image(images),
        "tower.image+vpt8": lambda: backbone.encode_image(images, vpt),
        "open_clip.encode_text": lambda: backbone.model.encode_text(tokens),
        "tower.text": lambda: backbone.encode_text(tokens),
    }
    results = {}
    with torch.no_grad(), ctx:
        for name, fn in cases.items():
            seconds = median_seconds(fn, args.repeats)
            results[name] = {"seconds": round(seconds, 4), "items_per_s": round(args.batch / seconds, 1)}
    print(json.dumps({
        "benchmark": "towers", "model": args.model, "batch": args.batch,
        "autocast": args.autocast, **environment(device), "results": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
