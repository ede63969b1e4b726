"""The loop state as JSON + safetensors: every type the trainer stores survives the round trip with its type, RNGs
continue where they were, optimizers step as if never saved, and damaged or old (pickled) states are refused."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprompt.core.checkpoint import (
    STATE_TENSORS,
    flatten_state,
    load_loop_state,
    rng_state,
    save_loop_state,
    set_rng_state,
    unflatten_state,
)
from vlprompt.errors import ConfigError
from vlprompt.run_layout import STATE, has_loop_state


def _same(a, b) -> None:
    """Equal values of equal types, recursively (tensors: dtype, shape and bits)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _round_trip(state):
    tree, tensors = flatten_state(state)
    return unflatten_state(json.loads(json.dumps(tree)), tensors)


def test_every_stored_type_round_trips_with_its_type() -> None:
    state = {
        "step": 7, "lr": 0.1 + 0.2, "flags": [True, None, "x"], "inf": math.inf, "nan": math.nan,
        "big": 2**70, "betas": (0.9, 0.999), "nested": ((1, 2), [3, (4,)]),
        "by_id": {0: {"exp_avg": torch.randn(3, 2)}, 1: {"step": torch.tensor(3.0)}},  # optimizer: int keys
        "mixed": {(1, "a"): "tuple key", "s": 1},
        "__tensor__": "a user key that looks like a marker",
        "bf16": torch.randn(4, dtype=torch.bfloat16), "strided": torch.arange(12.0).reshape(3, 4).t(),
        "grad": torch.ones(2, requires_grad=True) * 2, "bytes": torch.randint(0, 255, (5,), dtype=torch.uint8),
        "keys": np.arange(6, dtype=np.uint32).reshape(2, 3), "f64": np.array([0.1, -2.5]),
        "np_scalar": np.float64(0.25),
    }  # fmt: skip
    back = _round_trip(state)
    expected = {**state, "grad": state["grad"].detach(), "np_scalar": 0.25}
    _same(expected, back)
    assert not back["strided"].requires_grad and back["strided"].is_contiguous()


def test_unstorable_values_fail_at_save_time() -> None:
    with pytest.raises(TypeError, match=r"state.optimizer.hook: cannot store a function"):
        flatten_state({"optimizer": {"hook": lambda: 0}})
    with pytest.raises(TypeError, match="cannot store a set"):
        flatten_state({"s": {1, 2}})
    with pytest.raises(TypeError, match="object arrays"):
        flatten_state({"a": np.array([None, 1], dtype=object)})


def test_rng_states_continue_exactly(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_loop_state(tmp_path, {"rng": rng_state()})
    expected = (random.random(), np.random.rand(3), torch.rand(3), np.random.randn(), random.gauss(0, 1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_loop_state(tmp_path)["rng"])
    got = (random.random(), np.random.rand(3), torch.rand(3), np.random.randn(), random.gauss(0, 1))
    assert got[0] == expected[0] and got[3] == expected[3] and got[4] == expected[4]
    assert np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_numpy_cached_gaussian_is_kept(tmp_path: Path) -> None:
    np.random.seed(3)
    np.random.randn()  # Box-Muller leaves one gaussian cached: part of the state
    state = np.random.get_state()
    assert state[3] == 1
    save_loop_state(tmp_path, {"numpy": state})
    _same(state, load_loop_state(tmp_path)["numpy"])


def test_optimizer_schedule_and_scaler_resume_as_if_never_saved(tmp_path: Path) -> None:
    def build():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return p, opt, sched

    def step(p, opt, sched, k):
        p.grad = torch.linspace(-1, 1, 5) * (k + 1)
        opt.step()
        sched.step()

    p, opt, sched = build()
    for k in range(3):
        step(p, opt, sched, k)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    save_loop_state(tmp_path, {"opt": opt.state_dict(), "sched": sched.state_dict(), "scaler": scaler.state_dict()})
    saved_p = p.detach().clone()
    for k in range(3, 5):
        step(p, opt, sched, k)

    q, opt2, sched2 = build()
    state = load_loop_state(tmp_path)
    with torch.no_grad():
        q.copy_(saved_p)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(state["scaler"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and 0 in opt2.state_dict()["state"]
    for k in range(3, 5):
        step(q, opt2, sched2, k)
    assert torch.equal(q, p) and sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.get_scale() == 2.0**10


def test_files_are_json_and_safetensors(tmp_path: Path) -> None:
    save_loop_state(tmp_path, {"step": 3, "w": torch.ones(2)})
    saved = json.loads((tmp_path / STATE).read_text())
    assert saved["state"]["step"] == 3 and saved["state"]["w"] == {"__tensor__": "0"}
    assert (tmp_path / STATE_TENSORS).read_bytes()[8:9] == b"{"  # safetensors: length, then a JSON header
    assert has_loop_state(tmp_path)


def test_damaged_states_are_clear_errors(tmp_path: Path) -> None:
    save_loop_state(tmp_path, {"w": torch.ones(2)})
    saved = json.loads((tmp_path / STATE).read_text())
    (tmp_path / STATE).write_text(json.dumps({**saved, "state": {"w": {"__tensor__": "7"}}}))
    with pytest.raises(ConfigError, match=rf"{STATE}: damaged loop state .*names tensor '7'"):
        load_loop_state(tmp_path)
    (tmp_path / STATE).write_text(json.dumps({**saved, "state": {"a": {"__ndarray__": "0", "dtype": "|O",
                                                                       "shape": [1]}}}))  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape("'|O' is not a plain number type")):
        load_loop_state(tmp_path)
    (tmp_path / STATE).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{STATE}: damaged loop state"):
        load_loop_state(tmp_path)
    (tmp_path / STATE).write_text(json.dumps({"format": "something else", "state": {}}))
    with pytest.raises(ConfigError, match="damaged loop state"):
        load_loop_state(tmp_path)
    (tmp_path / STATE).write_text(json.dumps(saved))
    (tmp_path / STATE_TENSORS).write_bytes(b"\x00" * 3)
    with pytest.raises(ConfigError, match="damaged loop state"):
        load_loop_state(tmp_path)
    (tmp_path / STATE).unlink()
    with pytest.raises(ConfigError, match=f"not a complete checkpoint: {STATE} is missing"):
        load_loop_state(tmp_path)


@pytest.mark.parametrize("legacy", ["state.pt", "loop.pt"])
def test_an_older_pickled_state_is_recognised_and_refused(tmp_path: Path, legacy: str) -> None:
    torch.save({"step": 1}, tmp_path / legacy)  # harmless here, but never unpickled
    assert has_loop_state(tmp_path)  # so a new run does not overwrite it
    with pytest.raises(ConfigError, match=rf"{legacy}: this run directory was written by an older vlprompt"):
        load_loop_state(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_rng_and_optimizer_state_round_trip(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    torch.cuda.manual_seed_all(1)
    save_loop_state(tmp_path, {"rng": rng_state(), "opt": opt.state_dict()})
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(9)
    state = load_loop_state(tmp_path)
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    opt2 = torch.optim.Adam([p])
    opt2.load_state_dict(state["opt"])
    assert opt2.state[p]["exp_avg"].device == p.device
    assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])
