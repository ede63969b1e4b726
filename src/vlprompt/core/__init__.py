"""The core: the training loop and the services every command shares.

``factory`` (a config -> device, seeds, backbone + method), ``trainer`` (the training loop, single process or
``torchrun``), ``evaluate`` (retrieval evaluation), ``checkpoint`` (trainable tensors + loop state, resume),
``rundir`` (run directories and their status), ``progress``, ``distributed``, ``tracking`` (TensorBoard, W&B) and
``hub`` (export a run, load a run / export / ``hf-hub:`` id). Knows no paradigm: the runners above use it.
"""

from vlprompt.core.evaluate import evaluate_retrieval
from vlprompt.core.factory import build_model
from vlprompt.core.trainer import train

__all__ = ["build_model", "evaluate_retrieval", "train"]
