"""``vlprompt eval RUN_DIR_OR_CONFIG [key=value ...] [--out RUN_DIR]``: evaluate a trained run or a config
(zero-shot), optionally recording the result as a run directory for ``vlprompt report``."""

from __future__ import annotations

import argparse

from vlprompt.cli.common import print_metrics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run directory or a config", description=__doc__)
    p.add_argument("target", help="a run directory (its config.yaml and last checkpoint), an exported folder "
                   "(`vlprompt export`), hf-hub:ORG/NAME, or a YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--split", default="test", choices=["val", "test"], help="which annotation file to evaluate")
    p.add_argument(
        "--protocol",
        default="cross-modal",
        choices=["cross-modal", "single-modal", "mixed", "all"],
        help="cross-modal: R@K only; single-modal adds i2i/t2t NDCG@10/20/50, mixed adds i2it/t2it, all adds both",
    )
    p.add_argument(
        "--relevance",
        default=None,
        help="ROUGE-L relevance .npy [captions, images] of the gallery (loaded if present, else computed and saved)",
    )
    p.add_argument(
        "--official-ndcg", action="store_true", help="reproduce the RVLR reference code's NDCG quirks (see eval/ndcg)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="RUN_DIR",
        help="also write a run directory (config.yaml, env.json, metrics.json as a training run's) that "
        "`vlprompt report` reads, e.g. a zero-shot baseline beside trained runs",
    )
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.runners.eval_run import evaluate_target

    metrics = evaluate_target(
        args.target,
        args.overrides,
        args.split,
        args.protocol,
        args.relevance,
        official_ndcg=args.official_ndcg,
        out=args.out,
    )
    print_metrics(metrics, args.json, title=f"{args.target} ({args.split})")
    if args.out and not args.json:
        print(f"wrote run directory {args.out}")
    return 0
