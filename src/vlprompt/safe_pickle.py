"""The one home of unpickling in vlprompt: nothing it reads may run code.

A pickle may name any importable callable and call it while loading, so vlprompt never calls ``pickle.load``
or an unrestricted ``torch.load``. Formats that only exist as pickles (CIFAR-100's python batches, MSVD's
caption pickle, the refer toolkit's ``refs(unc).p``) go through :func:`load_pickle`, whose unpickler resolves
a global only from the caller's allow-list, mapped to objects chosen here (no module is imported by name):
containers and scalars (dict, list, tuple, str, bytes, int, float, bool, None) need no global at all,
:data:`NUMPY_ARRAYS` adds plain numpy array reconstruction. ``.pth`` files go through
:func:`load_torch_tensors` (``torch.load(weights_only=True)``: tensors and plain values only).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlprompt.errors import DataError

Allowed = Mapping[tuple[str, str], Any]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Python 3 writes ``bytes`` into protocol-2 pickles as ``_codecs.encode(text, "latin1")``; only that form."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as bytes written by a protocol-2 pickle")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """Protocol-2 pickles write ``b""`` as ``bytes()``; any argument (``bytes(10**12)``) is refused."""
    return b""


#: ``bytes`` values inside protocol-2 pickles written by Python 3.
BYTES: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}

# Found through numpy's own pickling rather than by module path: the path moved (numpy.core -> numpy._core in
# numpy 2) and old files name the old one, so both names map to whatever this numpy uses.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

#: Plain numpy arrays: ``ndarray`` rebuilt from a dtype, a shape and raw bytes (every protocol, numpy 1 and 2
#: names), plus :data:`BYTES`. CIFAR-100's batches need exactly this; an object array can hold only objects that
#: are themselves allowed.
NUMPY_ARRAYS: dict[tuple[str, str], Any] = {
    **BYTES,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list: kept apart from damage so the message can say why."""


class _Restricted(pickle.Unpickler):
    def __init__(self, file: Any, allowed: Allowed, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        # Replaces the default lookup entirely: nothing is imported, only listed objects are handed out.
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load_pickle(path: Path, allowed: Allowed | None = None, *, encoding: str = "ASCII", kind: str = "pickle") -> Any:
    """Unpickle ``path`` building only plain values and the globals of ``allowed`` (default: none at all).

    ``encoding`` is :class:`pickle.Unpickler`'s (``"bytes"`` keeps Python 2 strings as bytes, as CIFAR needs);
    ``kind`` names the file in messages. Every failure is a :class:`~vlprompt.errors.DataError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _Restricted(f, allowed or {}, encoding).load()
    except FileNotFoundError as err:
        raise DataError(f"{kind} not found: {path}") from err
    except OSError as err:
        raise DataError(f"cannot read {kind} {path}: {err}") from err
    except _Refused as err:
        raise DataError(
            f"{path}: refusing to unpickle {err}: a {kind} holds plain values only, and a pickle that names other "
            "objects can run code while loading (was this file replaced?)"
        ) from None
    except Exception as err:  # a damaged pickle fails in many ways (opcodes, truncation, bad arguments)
        raise DataError(f"{path} is not a readable {kind} ({type(err).__name__}: {err})") from err


def torch_refusal(path: Path, kind: str, err: BaseException) -> str | None:
    """The message for ``torch.load(weights_only=True)`` failing on ``path`` (wrapped or not), else None.

    torch's own text advises turning weights-only loading off, which vlprompt never does; the message quotes
    only its reason (e.g. ``Unsupported global: GLOBAL pathlib.Path.touch``).
    """
    while err is not None and not isinstance(err, pickle.UnpicklingError):
        err = err.__cause__ or err.__context__  # wrapped by a loader in between (open_clip)
    if err is None:
        return None
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(err))
    reason = found.group(1).strip() if found else str(err).splitlines()[0]
    if "Unsupported global" not in reason:
        return f"cannot read {kind} {path}: not a PyTorch tensor file, or damaged ({reason})"
    return (
        f"{path}: refusing to load this {kind}: it holds more than tensors and plain values ({reason}); "
        "vlprompt reads .pt/.pth files only as tensors, since other pickled objects can run code while loading"
    )


def load_torch_tensors(path: Path, kind: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values, never code; clear errors."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise DataError(f"{kind} not found: {path}") from err
    except Exception as err:  # refused objects, not a torch file, truncated zip, ...
        refused = torch_refusal(path, kind, err)
        if refused is not None:
            raise DataError(refused) from None
        raise DataError(f"cannot read {kind} {path} ({type(err).__name__}: {err})") from err
