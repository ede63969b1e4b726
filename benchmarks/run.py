"""The README's performance table: train-step and eval throughput and peak memory of each method (JSON).

    python benchmarks/run.py                                   # CPU set: vlprompt-tiny, batch 32
    python benchmarks/run.py --model ViT-B-16 --batch 64 --device cuda --autocast bf16 --out gpu.json

Each method gets a fresh random-initialised backbone (no weights are downloaded) and a synthetic batch: images
``[B, 3, S, S]`` with B captions, or for video methods ``[B, T, 3, S, S]``. A train step is forward, loss,
backward and AdamW; the eval forward encodes the same batch under ``no_grad``. Seconds are medians; samples/s =
B / seconds. Each method runs in its own process so the CPU peak-memory figure (peak RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import emit, environment, median_seconds, peak_memory_mb, reset_peak_memory

import vlprompt
from vlprompt.methods import build_method

#: name -> (method section, input kind). The set the README's table shows.
METHODS: dict[str, tuple[dict, str]] = {
    "zeroshot": ({"name": "zeroshot"}, "image"),
    "finetune": ({"name": "finetune"}, "image"),
    "coop": ({"name": "coop"}, "image"),
    "vpt_deep": ({"name": "vpt"}, "image"),
    "maple": ({"name": "maple"}, "image"),
    "meanp_video": ({"name": "finetune"}, "video"),
    "dgl_linear": ({"name": "dgl", "latent": "linear"}, "video"),
    "dgl_transformer": ({"name": "dgl", "latent": "transformer"}, "video"),
}
CAPTION = "a small red star moves slowly to the left across a grey background"


def measure(name: str, args: argparse.Namespace) -> dict:
    """Train-step and eval throughput of one method."""
    device = torch.device(args.device)
    section, kind = METHODS[name]
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone(args.model, pretrained=None, device=device)
    if section["name"] == "dgl":  # per-frame prompts follow the clip length
        section = {**section, "frames": args.frames}
    method = build_method(section, backbone).to(device)
    size = backbone.image_size
    shape = (args.batch, args.frames, 3, size, size) if kind == "video" else (args.batch, 3, size, size)
    visual = torch.randn(shape, device=device)
    tokens = method.tokenize([CAPTION] * args.batch).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    reset_peak_memory(device)

    def evaluate() -> None:
        with torch.no_grad(), ctx:
            plans = method.plans()
            method.encode_visual(visual, None, plans)
            method.encode_text(tokens, plans)

    row = {"input": kind, "trainable": method.parameter_counts()["trainable"]}
    eval_s = median_seconds(evaluate, args.repeats)
    row.update(eval_s=round(eval_s, 4), eval_samples_per_s=round(args.batch / eval_s, 2))
    params = method.trainable_parameters()
    if params:
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step() -> None:
            with ctx:
                loss = method(visual, tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_s = median_seconds(step, args.repeats)
        row.update(train_step_s=round(train_s, 4), train_samples_per_s=round(args.batch / train_s, 2))
    row["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vlprompt-tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    results = {}
    for name in args.methods.split(","):
        command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr)
    report = {
        "benchmark": "methods", "model": args.model, "batch": args.batch, "frames": args.frames,
        "autocast": args.autocast, **environment(torch.device(args.device)), "results": results,
    }  # fmt: skip
    emit(report, args.out)


if __name__ == "__main__":
    main()
