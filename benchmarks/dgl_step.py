"""Training-step and eval-forward time of meanP fine-tuning, DGL-Linear and DGL-Transformer, beside the floor.

    python benchmarks/dgl_step.py --model ViT-B-32-quickgelu --videos 4 --frames 12 --captions 4 [--autocast bf16]

The floor is the frozen vision tower alone on the same tokens (B*T frames of 1 + P + patches tokens): forward,
and forward plus backward to the prompt tokens. Prints one JSON object (seconds are medians over --repeats).
"""

from __future__ import annotations

import argparse
import json

import torch
from common import environment, median_seconds, peak_memory_mb

import vlprompt
from vlprompt.backbone import PromptPlan
from vlprompt.methods import build_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32-quickgelu")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--captions", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--methods", default="meanp,dgl_linear,dgl_transformer,floor")
    args = p.parse_args()
    device = torch.device(args.device)
    captions = ["a man is playing a guitar on a stage in front of a crowd"] * args.captions
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    sections = {
        "meanp": {"name": "finetune"},
        "dgl_linear": {"name": "dgl", "latent": "linear", "frames": args.frames},
        "dgl_transformer": {"name": "dgl", "latent": "transformer", "frames": args.frames},
    }
    results = {}
    for name in args.methods.split(","):
        torch.manual_seed(0)
        backbone = vlprompt.load_backbone(args.model, pretrained=None, device=device)
        size = backbone.image_size
        video = torch.randn(args.videos, args.frames, 3, size, size, device=device)
        if name == "floor":
            results[name] = floor(backbone, video, args, ctx)
            continue
        method = build_method(sections[name], backbone).to(device)
        results[name] = time_method(method, video, captions, args.repeats, ctx)
    print(json.dumps({
        "benchmark": "dgl_step", "model": args.model, "videos": args.videos, "frames": args.frames,
        "captions": args.captions, "autocast": args.autocast, **environment(device),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "results": results,
    }, indent=2))  # fmt: skip


def time_method(method, video: torch.Tensor, captions: list[str], repeats: int, ctx) -> dict[str, float]:
    """Median train step (forward, loss, backward, AdamW) and eval forward of one method."""
    tokens = method.tokenize(captions)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
    pair = video[: len(captions)]  # the caption batch pairs with the first videos

    def step() -> None:
        with ctx:
            loss = method(pair, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def evaluate() -> None:
        with torch.no_grad(), ctx:
            method.encode_video(video)
            method.encode_text(tokens)

    train_s = median_seconds(step, repeats)
    return {
        "train_step_s": round(train_s, 3),
        "train_videos_per_s": round(len(pair) / train_s, 2),
        "eval_forward_s": round(median_seconds(evaluate, repeats), 3),
        "trainable": method.parameter_counts()["trainable"],
    }


def floor(backbone, video: torch.Tensor, args: argparse.Namespace, ctx) -> dict[str, float]:
    """The frozen tower alone on B*T frames with 4 inserted prompt tokens: forward, and forward + input backward."""
    backbone.freeze()
    frames = video.flatten(0, 1)
    prompts = torch.zeros(4, backbone.vision_width, device=video.device, requires_grad=True)

    def forward() -> None:
        with torch.no_grad(), ctx:
            backbone.vision(frames, PromptPlan(insert=prompts.detach()))

    def forward_backward() -> None:
        with ctx:
            out = backbone.vision(frames, PromptPlan(insert=prompts)).pooled
        out.float().sum().backward()

    return {
        "forward_s": round(median_seconds(forward, args.repeats), 3),
        "forward_backward_s": round(median_seconds(forward_backward, args.repeats), 3),
    }


if __name__ == "__main__":
    main()
