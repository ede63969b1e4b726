"""``vlprompt metrics``: retrieval metrics (R@K, MdR, MnR) of a saved similarity matrix."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from vlprompt.errors import DataError


def register(subparsers: Any) -> None:
    """Add the ``metrics`` subcommand."""
    p = subparsers.add_parser(
        "metrics",
        help="retrieval metrics of a saved similarity matrix",
        description="Retrieval metrics of a saved [queries, gallery] similarity matrix. Rows are queries and "
        "row i's ground truth is column i unless --gt says otherwise.",
    )
    p.add_argument("--sim", required=True, type=Path, metavar="FILE.npy", help="2-D similarity matrix (.npy)")
    p.add_argument("--transpose", action="store_true", help="evaluate the other direction: columns are the queries")
    p.add_argument(
        "--gt",
        type=Path,
        metavar="FILE",
        help="ground truth per row: .npy of ints, or .json list of ints / list of lists (default: the diagonal)",
    )
    p.add_argument("--ties", choices=["optimistic", "pessimistic"], default="optimistic", help="how ties count")
    p.add_argument("--prefix", help="metric key prefix (default: t2v, or v2t with --transpose)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    q = p.add_argument_group("QB-Norm (reported separately, under keys '<prefix>+qbnorm/...')")
    q.add_argument("--qbnorm-bank", type=Path, metavar="BANK.npy",
                   help="similarities of a TRAINING query bank to the same gallery, [n_bank, n_gallery] in the "
                        "evaluated direction (after --transpose)")  # fmt: skip
    q.add_argument("--qbnorm-beta", type=float, default=1.0, help="inverted-softmax temperature (choose on val)")
    q.add_argument("--qbnorm-k", type=int, default=1, help="top-k used for the activation set")
    q.add_argument("--qbnorm-theta", type=int, default=1, help="activation threshold (DGL: 3 for t2v, 5 for v2t)")
    p.set_defaults(func=run)


def _load_sim(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"similarity file not found: {path}")
    try:
        sim = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read similarity matrix {path}: {err}") from err
    if not isinstance(sim, np.ndarray) or sim.ndim != 2:
        shape = getattr(sim, "shape", None)
        raise DataError(f"{path}: expected a 2-D [queries, gallery] array, got shape {shape}")
    return sim


def _load_gt(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"ground-truth file not found: {path}")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read ground truth {path}: {err}") from err
    raise DataError(f"ground truth must be a .npy or .json file: {path}")


def run(args: argparse.Namespace) -> int:
    """Load the matrix (and ground truth), rank every query and print the metrics."""
    # Imported here so `vlprompt --help` does not pay for importing torch.
    from vlprompt.eval.retrieval import invert_ground_truth, ranks_from_similarity, retrieval_metrics

    sim = _load_sim(args.sim)
    gt = _load_gt(args.gt) if args.gt is not None else None
    prefix = args.prefix or ("v2t" if args.transpose else "t2v")
    try:
        if args.transpose:
            # The given mapping is row -> column(s); columns as queries need column -> rows.
            if gt is not None:
                gt = invert_ground_truth(gt, sim.shape[0], sim.shape[1])
            sim = sim.T
        ranks = ranks_from_similarity(sim, gt, ties=args.ties)
    except ValueError as err:
        where = f"{args.sim}" if args.gt is None else f"{args.sim} with {args.gt}"
        raise DataError(f"{where}: {err}") from err
    metrics = retrieval_metrics(ranks, prefix)
    if args.qbnorm_bank is not None:
        from vlprompt.eval.qbnorm import qb_norm

        bank = _load_sim(args.qbnorm_bank)
        try:
            normed = qb_norm(sim, bank, beta=args.qbnorm_beta, k=args.qbnorm_k, theta=args.qbnorm_theta)
            qb_ranks = ranks_from_similarity(normed, gt, ties=args.ties)
        except ValueError as err:
            raise DataError(f"{args.qbnorm_bank}: {err}") from err
        metrics.update(retrieval_metrics(qb_ranks, f"{prefix}+qbnorm"))
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{sim.shape[0]} queries x {sim.shape[1]} candidates, ties={args.ties}")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:8.3f}")
    return 0
