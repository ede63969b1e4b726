"""Requests/s and latency of ``vlprompt serve`` under a bounded load from 1, 8 and 32 concurrent clients (JSON).

    python benchmarks/serve_load.py                                  # a small embedded world, vlprompt-tiny
    python benchmarks/serve_load.py --index idx/world_test --requests 2000 --repeats 3 --out serve.json
    PYTHONPATH=/tmp/wt_before/src python benchmarks/serve_load.py   # another version of the service, same load
    python benchmarks/serve_load.py --against /tmp/wt_before/src     # this version and another, side by side

The service runs as ``python -m vlprompt serve INDEX --host 127.0.0.1 --device cpu --log-level warning`` in its
own process (``--serve-arg`` adds flags), so the version measured is whichever ``vlprompt`` the Python path
finds. Without ``--index`` a small embedded world is built and its test images are indexed with
``vlprompt-tiny`` at its ``world`` weights, in a temporary folder. Each level opens that many keep-alive
connections on loopback and sends text queries (the items' captions, in a fixed order) to ``/api/search`` until
``--requests`` have been answered or ``--max-seconds`` have passed, after ``--warmup`` uncounted ones. The
client is a few lines of asyncio HTTP/1.1 (standard library only): on a small machine it shares the CPU with the
service, so it should cost as little as possible. Latency is from sending a request to reading its whole
answer; an error is any answer other than 200 (counted by status) or a failed connection. The service's CPU
time per answered request (from /proc, Linux) is reported too: on a machine shared with other work it moves much
less than requests/s. With ``--repeats`` each level's figures are the medians over the repeats (errors summed);
the machine's load average before and after is recorded beside them. With ``--against PYTHONPATH`` a second service
(the version that Python path finds first) runs beside this one and the two are measured in turn, level by level
and repeat by repeat, so that both see the same machine: requests/s on a shared machine moves by tens of percent
within an hour, which makes back-to-back runs of two versions hard to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import torch
from common import emit, environment


def build_small_index(tmp: Path) -> Path:
    """A small embedded world's test images indexed with vlprompt-tiny (CLI, so any version builds it)."""
    vlp = [sys.executable, "-m", "vlprompt"]
    subprocess.run([*vlp, "world", "build", "--out", str(tmp / "world"), "--size", "small"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*vlp, "index", "build", "--model", "vlprompt-tiny", "--pretrained", "world", "--data",
                    str(tmp / "world" / "retrieval" / "test_clean.json"), "--out", str(tmp / "index"),
                    "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return tmp / "index"


def captions(index: Path) -> list[str]:
    """The index items' captions (or texts), in item order: the queries."""
    texts: list[str] = []
    for line in (index / "items.jsonl").read_text().splitlines():
        item = json.loads(line)
        texts += [item["text"]] if item.get("text") else list(item.get("captions") or [])
    if not texts:
        raise SystemExit(f"{index}: its items have no captions to query with")
    return texts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    index: Path, port: int, extra: list[str], log: Path, pythonpath: str | None = None
) -> subprocess.Popen:
    """``vlprompt serve`` in its own process (``pythonpath`` first on its path), once ``/healthz`` answers."""
    cmd = [sys.executable, "-m", "vlprompt", "serve", str(index), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--log-level", "warning", *extra]  # fmt: skip
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service stopped (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the service did not start in 180 s:\n{log.read_text()[-3000:]}")


class Connection:
    """One keep-alive HTTP/1.1 connection: send a GET, read the status and the whole body."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").strip() == "close":
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far, where /proc tells (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def load(port: int, targets: list[str], clients: int, requests: int, max_seconds: float, timeout: float,
               server_pid: int | None = None) -> dict[str, Any]:  # fmt: skip
    """``clients`` connections sending ``targets`` in turn until ``requests`` are answered or time is up.

    With ``server_pid``, also the service's CPU milliseconds per answered request: unlike requests/s, that
    figure hardly moves when other work on the machine takes CPU time away from the service.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def client() -> None:
        nonlocal sent
        conn = Connection(port)
        while sent < requests and time.perf_counter() < deadline:
            target = targets[sent % len(targets)]
            sent += 1
            start = time.perf_counter()
            try:
                status = await asyncio.wait_for(conn.get(target), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as err:
                errors[type(err).__name__] += 1
                conn.close()
                continue
            if status == 200:
                latencies.append(1000 * (time.perf_counter() - start))
            else:
                errors[str(status)] += 1
        conn.close()

    cpu_before = cpu_seconds(server_pid) if server_pid else None
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    cpu_after = cpu_seconds(server_pid) if server_pid else None
    cpu_ms = None
    if cpu_before is not None and cpu_after is not None and latencies:
        cpu_ms = round(1000 * (cpu_after - cpu_before) / len(latencies), 3)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "answered": len(latencies),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(cuts[49], 2),
        "p99_ms": round(cuts[98], 2),
        "server_cpu_ms_per_request": cpu_ms,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats (errors summed), and the runs themselves."""
    keys = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="index folder (default: build a small one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=1000, help="answered requests per level and repeat")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time limit per level and repeat")
    parser.add_argument("--warmup", type=int, default=50, help="uncounted requests before each level")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as an error")
    parser.add_argument("--serve-arg", action="append", default=[], help="a flag for `vlprompt serve` (repeatable)")
    parser.add_argument(
        "--against",
        default=None,
        metavar="PYTHONPATH",
        help="also serve the version this Python path finds first, measured in turn with this one",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp_dir:
        tmp = Path(tmp_dir)
        index = args.index or build_small_index(tmp)
        targets = ["/api/search?" + urlencode({"q": q, "k": args.k}) for q in captions(index)]
        load_before = os.getloadavg()
        versions = {"this": None, **({"against": args.against} if args.against else {})}
        servers: dict[str, tuple[int, subprocess.Popen]] = {}
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {c: [] for c in args.clients} for name in versions}
        try:
            for name, path in versions.items():
                port = free_port()
                servers[name] = port, start_server(index, port, args.serve_arg, tmp / f"{name}.log", path)
            for _ in range(args.repeats):
                for clients in args.clients:
                    for name, (port, server) in servers.items():
                        asyncio.run(load(port, targets, clients, args.warmup, args.max_seconds, args.timeout))
                        runs[name][clients].append(
                            asyncio.run(
                                load(port, targets, clients, args.requests, args.max_seconds, args.timeout, server.pid)
                            )
                        )
        finally:
            for _, server in servers.values():
                server.terminate()
            for _, server in servers.values():
                server.wait(timeout=30)
        manifest = json.loads((index / "manifest.json").read_text())
        emit(
            {
                "benchmark": "serve_load",
                "index": {
                    "items": manifest["count"],
                    "kind": manifest["index"]["kind"],
                    "model": manifest["model"].get("target"),
                    "built": args.index is None,
                },
                "load": {
                    "requests": args.requests,
                    "max_seconds": args.max_seconds,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "k": args.k,
                    "queries": len(targets),
                    "serve_args": args.serve_arg,
                },
                "levels": {str(c): median_run(r) for c, r in runs["this"].items()},
                **(
                    {
                        "against": {
                            "pythonpath": args.against,
                            "levels": {str(c): median_run(r) for c, r in runs["against"].items()},
                        }
                    }
                    if args.against
                    else {}
                ),
                "loadavg": {
                    "before": [round(x, 2) for x in load_before],
                    "after": [round(x, 2) for x in os.getloadavg()],
                },
                "cores": os.cpu_count(),
                **environment(torch.device("cpu")),
            },
            args.out,
        )


if __name__ == "__main__":
    main()
