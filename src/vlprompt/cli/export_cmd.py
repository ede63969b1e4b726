"""``vlprompt export RUN_DIR OUT_DIR``: share a trained prompt as a folder in the Hugging Face Hub layout.

OUT_DIR gets the run's resolved ``config.yaml``, its trained tensors only (``trainable.safetensors``), its
``metrics.json`` and a model card (``README.md``: method, backbone and pretrained tag, data, metrics, trainable
parameters, the command that reproduces it, the reference code's licence). Every command that takes a run directory
or ``--model`` (eval, index build, ``vlprompt.from_pretrained``) also takes OUT_DIR, or ``hf-hub:ORG/NAME`` once it
is uploaded (e.g. ``hf upload ORG/NAME OUT_DIR``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="share a trained run as a Hugging Face Hub folder", description=__doc__)
    p.add_argument("run_dir", help="a finished `vlprompt train` run directory")
    p.add_argument("out_dir", help="folder to write (the Hub repository's contents)")
    p.add_argument("--license", default="unknown", help="the card's licence id (mit, apache-2.0, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR when it holds an earlier export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.core.hub import export_run

    out = export_run(args.run_dir, args.out_dir, license=args.license, overwrite=args.overwrite)
    print(f"{out}: exported (config.yaml, trainable.safetensors, metrics.json, README.md)")
    return 0
