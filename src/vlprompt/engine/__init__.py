"""Engine: training loop, evaluation, checkpoints, run directories and progress display."""

from vlprompt.engine.evaluate import evaluate_retrieval
from vlprompt.engine.trainer import train

__all__ = ["evaluate_retrieval", "train"]
