"""Metrics as pure functions on tensors and arrays."""

from vlprompt.eval.retrieval import (
    bidirectional_metrics,
    bidirectional_metrics_from_similarity,
    invert_ground_truth,
    ranks_from_features,
    ranks_from_similarity,
    retrieval_metrics,
)

__all__ = [
    "bidirectional_metrics",
    "bidirectional_metrics_from_similarity",
    "invert_ground_truth",
    "ranks_from_features",
    "ranks_from_similarity",
    "retrieval_metrics",
]
