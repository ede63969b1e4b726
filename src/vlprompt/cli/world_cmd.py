"""``vlprompt world build --out DIR [--seed S] [--size small|default] [--workers N]``: write the embedded world."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="build the embedded benchmark world", description=__doc__)
    wsub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    b = wsub.add_parser("build", help="generate the world (deterministic: same seed, same bytes)")
    b.add_argument("--out", type=Path, required=True, help="output folder (a previous world there is replaced)")
    b.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    b.add_argument("--size", choices=["small", "default"], default="default", help="small is for tests")
    b.add_argument("--workers", type=int, default=0, help="rendering processes (0 = up to 4, one per core)")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.data.world import build_world

    workers = args.workers if args.workers > 0 else min(4, os.cpu_count() or 1)
    s = build_world(args.out, seed=args.seed, size=args.size, workers=workers)
    c = s["counts"]
    print(f"world (seed {s['seed']}, size {s['size']}, version {s['version']}) -> {s['out']}")
    print(f"  {s['images']} images, {s['videos']} videos, {s['files']} files")
    print(f"  built in {s['seconds']:.1f} s with {workers} worker(s)")
    print(f"  base: {c['base']['train_images']} train / {c['base']['val_images']} val images (clean)")
    r = c["retrieval"]
    print(f"  retrieval: {r['train_images']} train / {r['val_images']} val / {r['test_images_per_domain']} test images"
          f" per domain, {r['shift_train_images_per_domain']} shifted-domain train images per domain")  # fmt: skip
    k = c["continual"]
    print(f"  continual: {k['tasks']} tasks x {k['train_per_task']} train / {k['val_per_task']} val /"
          f" {k['test_per_task']} test images")  # fmt: skip
    q = c["classification"]
    print(
        f"  classification: {q['classes']} classes in {q['cil_tasks']} tasks, {q['train_per_class']} train /"
        f" {q['val_per_class']} val / {q['test_per_class_per_domain']} test per class, test in every domain"
    )
    v = c["video"]
    print(f"  video: {v['train']} train / {v['val']} val / {v['test']} test videos of {v['frames']} frames")
    g = c["grounding"]
    print(
        f"  grounding: {g['base_train']['expressions']} base train / {g['train']['expressions']} train /"
        f" {g['val']['expressions']} val / {g['test']['expressions']} test expressions, test in every domain"
    )
    return 0
