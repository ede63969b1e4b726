"""The restricted unpickler: plain values always, numpy arrays only when asked, every other global refused; and the
tensor-only torch loader's messages."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprompt.errors import DataError
from vlprompt.safe_pickle import BYTES, NUMPY_ARRAYS, load_pickle, load_torch_tensors

PLAIN = {"a": [1, 2.5, None, True], "b": ("x", b"raw"), 3: {"nested": [[]]}}


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_values_need_no_global(tmp_path: Path, protocol: int) -> None:
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(PLAIN, protocol=protocol))
    # protocol 2 writes bytes as _codecs.encode(...): the one global that plain values may need
    allowed = BYTES if protocol == 2 else None
    assert load_pickle(tmp_path / "p.pkl", allowed) == PLAIN


def test_protocol_2_bytes_need_the_bytes_globals(tmp_path: Path) -> None:
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({b"k": b"", b"v": b"\xff\x00"}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle _codecs.encode"):
        load_pickle(tmp_path / "p.pkl")
    assert load_pickle(tmp_path / "p.pkl", BYTES) == {b"k": b"", b"v": b"\xff\x00"}


def test_the_bytes_globals_build_bytes_and_nothing_else() -> None:
    encode, empty = BYTES[("_codecs", "encode")], BYTES[("builtins", "bytes")]
    assert encode("\xff", "latin1") == b"\xff" and empty() == b""
    with pytest.raises(pickle.UnpicklingError):
        encode("x", "zlib_codec")  # other codecs (decompressors, ...) are not pickled bytes
    with pytest.raises(TypeError):
        empty(10**12)  # bytes(n) would allocate n bytes


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_arrays_only_when_allowed(tmp_path: Path, protocol: int) -> None:
    data = {b"data": np.arange(24, dtype=np.uint8).reshape(4, 6), b"f": np.linspace(0, 1, 3)}
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(DataError, match=r"a.pkl: refusing to unpickle (numpy|_codecs)"):
        load_pickle(tmp_path / "a.pkl")
    back = load_pickle(tmp_path / "a.pkl", NUMPY_ARRAYS)
    assert back[b"data"].dtype == np.uint8 and np.array_equal(back[b"data"], data[b"data"])
    assert np.array_equal(back[b"f"], data[b"f"])


def test_numpy_1_names_map_to_this_numpy(tmp_path: Path) -> None:
    # numpy 1 (and CIFAR's files) name numpy.core.multiarray; numpy 2 moved it to numpy._core.
    blob = pickle.dumps(np.arange(3, dtype=np.int16), protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as numpy 1 wrote it
    assert b"numpy.core.multiarray\n_reconstruct" in blob
    (tmp_path / "old.pkl").write_bytes(blob)
    assert np.array_equal(load_pickle(tmp_path / "old.pkl", NUMPY_ARRAYS), np.arange(3, dtype=np.int16))


def test_other_globals_are_refused_with_the_file_named(tmp_path: Path) -> None:
    for value in (Path("x"), {1, 2}, np.float32(1.0), complex(1, 2)):  # each is pickled as a global call
        (tmp_path / "g.pkl").write_bytes(pickle.dumps({"v": value}, protocol=2))
        with pytest.raises(DataError, match=rf"{tmp_path / 'g.pkl'}: refusing to unpickle \w"):
            load_pickle(tmp_path / "g.pkl", NUMPY_ARRAYS)


def test_damaged_and_missing_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="caption pickle not found"):
        load_pickle(tmp_path / "none.pkl", kind="caption pickle")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(PLAIN)[:-5])
    with pytest.raises(DataError, match=r"cut.pkl is not a readable pickle"):
        load_pickle(tmp_path / "cut.pkl")
    (tmp_path / "text.pkl").write_text("just text")
    with pytest.raises(DataError, match=r"text.pkl is not a readable pickle"):
        load_pickle(tmp_path / "text.pkl")


def test_torch_tensors_load_and_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "betas": (0.9, 0.99)}, tmp_path / "ok.pth")
    state = load_torch_tensors(tmp_path / "ok.pth")
    assert torch.equal(state["state_dict"]["w"], torch.ones(2)) and state["epoch"] == 3
    torch.save({"w": torch.ones(2), "path": Path("x")}, tmp_path / "obj.pth")
    with pytest.raises(DataError, match=r"obj.pth: refusing to load this model file: .*Unsupported global") as err:
        load_torch_tensors(tmp_path / "obj.pth", "model file")
    assert "weights_only=False" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(DataError, match=r"cannot read checkpoint .*junk.pth: not a PyTorch tensor file"):
        load_torch_tensors(tmp_path / "junk.pth")
    with pytest.raises(DataError, match="checkpoint not found"):
        load_torch_tensors(tmp_path / "none.pth")
