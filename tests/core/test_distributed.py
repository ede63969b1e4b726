"""Multi-process training on CPU (gloo, 2 processes): same loss and gradients as one process on the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vlprompt
from vlprompt.core.distributed import Dist, rank_share, wrap
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method

CAPTIONS = ["a red star", "a blue circle moving left", "two green squares", "a yellow triangle on grey"]


def test_rank_share_splits_every_global_batch() -> None:
    order = list(range(10, 22))  # 12 items, global batch 4 -> 3 batches
    shares = [rank_share(order, 4, Dist(r, 2)) for r in range(2)]
    assert shares == [[10, 11, 14, 15, 18, 19], [12, 13, 16, 17, 20, 21]]
    assert sorted(shares[0] + shares[1]) == order
    assert rank_share(order[:7], 4, Dist(1, 2)) == [12, 13]  # the incomplete last batch is dropped
    with pytest.raises(ConfigError, match="not divisible"):
        rank_share(order, 5, Dist(0, 2))


def _method():
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone("vlprompt-tiny", pretrained=None)
    torch.manual_seed(1)
    return build_method({"name": "vpt", "n_tokens": 2}, backbone)


def _batch():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _rank_step(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    method = _method()
    model = wrap(method, Dist(rank, world), torch.device("cpu"))
    images, local = _batch(), len(CAPTIONS) // world
    part = slice(rank * local, (rank + 1) * local)
    loss = model(images[part], method.tokenize(CAPTIONS[part]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one_on_the_global_batch(tmp_path: Path) -> None:
    method = _method()
    loss = method(_batch(), method.tokenize(CAPTIONS))
    loss.backward()
    single = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert single and all(g.abs().sum() > 0 for g in single.values())
    mp.spawn(_rank_step, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-5), (rank, got["loss"], loss)
        for name, grad in single.items():
            assert torch.allclose(got["grads"][name], grad, atol=1e-6, rtol=1e-4), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_trains_with_rank0_io(image_text_set: Path, tmp_path: Path) -> None:
    config = tmp_path / "coop.yaml"
    config.write_text("method: {name: coop}\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "vlprompt", "train", str(config), "backbone.pretrained=null", f"data.root={image_text_set}",
        "data.train=train.json", "data.test=test.json", "train.epochs=1", "train.batch_size=8",
        f"out_dir={tmp_path}", "run_name=ddp", "train.eval_batch_size=16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    result = json.loads((run / "metrics.json").read_text())
    assert result["steps"] == 24 // 8
    assert "t2i/R@1" in result["test"]
    assert len(list((run / "checkpoints").glob("step_*"))) == 1
