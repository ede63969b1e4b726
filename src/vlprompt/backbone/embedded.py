"""Compact storage of the embedded tiny CLIPs shipped with vlprompt.

The embedded models only ever read the world's small vocabulary, so the 49,408-row token embedding
is stored sparsely: the rows of the tokens the world uses, the rest zero. Tensors are stored in
fp16 to keep everything shipped under 25 MB; they load into the model's dtype. The metrics in the
model cards are measured on exactly this stored form.

Text outside that vocabulary embeds as zero vectors, so such a model is blind to it. :func:`watch_vocabulary`
wraps the tokenizer of a model whose token table is mostly zero rows and warns once, loudly, when the text it
reads is mostly unknown to it (real captions on a world model), instead of letting it score at chance silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

log = logging.getLogger("vlprompt.backbone")

#: Share of a restricted-vocabulary model's text tokens it has no row for, above which it warns (world captions
#: have none; real captions on a world model have over half).
UNKNOWN_SHARE_WARNING = 0.2

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


def known_token_rows(model: nn.Module) -> Tensor | None:
    """Which token ids have a (non-zero) embedding row, as a CPU bool ``[vocab]``, when most rows are zero (the
    embedded models' sparse storage, or a model trained from one); None for a full vocabulary."""
    table = model.state_dict().get(_embedding_name(model))
    if table is None or table.dim() != 2:
        return None  # a Hugging Face text tower: not a CLIP token table
    known = table.detach().abs().amax(dim=1).ne(0).cpu()
    return known if int(known.sum()) < known.numel() // 2 else None


class VocabularyWatch:
    """A tokenizer that counts, over every text it tokenizes, the tokens its model has no embedding for, and logs
    one WARNING when they exceed ``threshold`` of the tokens seen (start/end and padding not counted). Everything
    else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Callable[..., Tensor], known: Tensor, model_name: str, threshold: float) -> None:
        self.tokenizer, self.known, self.model_name, self.threshold = tokenizer, known, model_name, threshold
        self.special = torch.tensor([0, *getattr(tokenizer, "all_special_ids", ())], dtype=torch.long)
        self.seen = self.unknown = 0
        self.examples: list[int] = []
        self.warned = False

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Tensor:
        tokens = self.tokenizer(texts, *args, **kwargs)
        if not self.warned:
            self.count(tokens)
        return tokens

    def count(self, tokens: Tensor) -> None:
        """Add a batch of token ids to the tally; warn once the unknown share passes the threshold."""
        ids = tokens.detach().cpu().long().flatten()
        ids = ids[~torch.isin(ids, self.special)]
        unknown = ids[~self.known[ids.clamp(0, self.known.numel() - 1)] | (ids >= self.known.numel())]
        self.seen += ids.numel()
        self.unknown += unknown.numel()
        self.examples += [i for i in unknown.unique().tolist() if i not in self.examples][: 8 - len(self.examples)]
        if self.seen and self.unknown / self.seen > self.threshold:
            self.warned = True
            log.warning(self.message())

    def message(self) -> str:
        """What the warning says: the share, examples, why it matters and what to do."""
        decode = getattr(self.tokenizer, "decode", None)
        words = [decode([i]).strip() for i in self.examples] if decode else [str(i) for i in self.examples]
        return (
            f"{self.model_name} knows only {int(self.known.sum())} of {self.known.numel():,} tokens (the embedded "
            f"world's vocabulary); {100 * self.unknown / self.seen:.0f}% of the {self.seen:,} text tokens it has "
            f"read have no embedding (e.g. {', '.join(repr(w) for w in words[:5])}) and count as zero vectors, so "
            "its text scores on this data are near chance. Use an open_clip model with real weights, e.g. "
            "backbone.name=ViT-B-32 backbone.pretrained=openai (--model ViT-B-32 --pretrained openai)."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "tokenizer":  # copy/pickle protocol, and no recursion before __init__
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def watch_vocabulary(
    tokenizer: Callable[..., Tensor], model: nn.Module, model_name: str, threshold: float = UNKNOWN_SHARE_WARNING
) -> Callable[..., Tensor]:
    """``tokenizer`` wrapped in a :class:`VocabularyWatch` when ``model`` has a restricted vocabulary, else as is."""
    known = known_token_rows(model)
    return tokenizer if known is None else VocabularyWatch(tokenizer, known, model_name, threshold)
