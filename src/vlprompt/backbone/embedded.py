"""Compact storage of the embedded tiny CLIPs shipped with vlprompt.

The embedded models only ever read the world's small vocabulary, so the 49,408-row token embedding
is stored sparsely: the rows of the tokens the world uses, the rest zero. Tensors are stored in
fp16 to keep everything shipped under 25 MB; they load into the model's dtype. The metrics in the
model cards are measured on exactly this stored form.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ROWS_KEY = "token_embedding.rows"
VALUES_KEY = "token_embedding.values"


def _embedding_name(model: nn.Module) -> str:
    return "text.token_embedding.weight" if hasattr(model, "text") else "token_embedding.weight"


def is_embedded_file(path: str | Path) -> bool:
    """True for a safetensors file written by :func:`save_embedded_weights`."""
    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return ROWS_KEY in f.keys()


def save_embedded_weights(
    model: nn.Module, path: Path, keep_token_ids: Iterable[int], metadata: dict[str, str]
) -> None:
    """Write ``model`` with a sparse token embedding (only ``keep_token_ids``) as fp16 safetensors."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    name = _embedding_name(model)
    table = state.pop(name)
    rows = torch.tensor(sorted(set(keep_token_ids)), dtype=torch.long)
    tensors = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    tensors[ROWS_KEY] = rows
    tensors[VALUES_KEY] = table[rows].half().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_embedded_weights(model: nn.Module, path: Path) -> None:
    """Load weights written by :func:`save_embedded_weights` into ``model`` (in place)."""
    tensors = load_file(str(path))
    rows, values = tensors.pop(ROWS_KEY), tensors.pop(VALUES_KEY)
    name = _embedding_name(model)
    reference = model.state_dict()[name]
    table = torch.zeros_like(reference)  # on the model's device (a GPU when created there)
    table[rows.to(table.device)] = values.to(table.device, table.dtype)
    tensors[name] = table
    tensors = {k: v.to(reference.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
