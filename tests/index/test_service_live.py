"""The search service behind a real uvicorn server on 127.0.0.1, set up as ``vlprompt serve`` sets it up
(:func:`~vlprompt.index.service.server_config`): over-long addresses, headers and bodies, and bytes that are not
HTTP, get a status and a message that the client reads, instead of a connection reset."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("faiss")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from vlprompt.errors import ConfigError  # noqa: E402
from vlprompt.index.service import (  # noqa: E402
    MAX_HEAD_BYTES,
    MAX_QUERY_CHARS,
    create_app,
    event_loop,
    http_protocol,
    server_config,
)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


PROTOCOLS = ["h11"] + (["httptools"] if importlib.util.find_spec("httptools") else [])


@pytest.fixture(scope="module", params=PROTOCOLS)
def live(index: Any, request: pytest.FixtureRequest) -> Iterator[tuple[Any, int]]:
    """The server and its port, with each bounded HTTP protocol installed."""
    sock = socket.socket()  # proto 0, as handed-over sockets often are: asyncio leaves Nagle on for these
    sock.bind(("127.0.0.1", 0))  # the server takes over this socket: no race for the port
    server = uvicorn.Server(server_config(create_app(index), log_level="error", http=request.param))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    yield server, sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def port(live: tuple[Any, int]) -> int:
    return live[1]


def exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` whole, then read the answer to its end: status and body. A reset raises (and fails)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get(target: bytes, headers: bytes = b"", body: bytes = b"", method: bytes = b"GET") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%sConnection: close\r\n\r\n%s" % (
        method, target, headers, length, body
    )  # fmt: skip


TOO_LONG = b"at most %d characters" % MAX_QUERY_CHARS
CASES = {
    # a 1 MB address: refused by the HTTP parser past MAX_HEAD_BYTES, then read to its end (no reset)
    "1 MB query": (get(b"/?q=" + b"x" * 1_000_000), 414, TOO_LONG),
    "100 KB query": (get(b"/?q=" + b"x" * 100_000), 414, TOO_LONG),
    "5000-character query": (get(b"/?q=" + b"y" * 5000), 400, b"The query is too long (5000 characters)"),
    "1 MB header": (get(b"/healthz", b"X-Big: " + b"h" * 1_000_000 + b"\r\n"), 431, b"%d bytes" % MAX_HEAD_BYTES),
    "1 MB body": (get(b"/", body=b"b" * 1_000_000, method=b"POST"), 413, b"reads no request body"),
    "not HTTP": (b"\x00\x01 hello\r\n\r\n", 400, b"not a valid HTTP request"),
    "a good query": (get(b"/api/search?q=a+red+star&k=2"), 200, b'"rank":2'),
    "a head just under the limit": (
        get(b"/healthz", b"X-Big: " + b"h" * (MAX_HEAD_BYTES - 200) + b"\r\n"),
        200,
        b'"ok":true',
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_requests_of_any_size_get_a_status_and_a_message(port: int, case: str) -> None:
    request, status, message = CASES[case]
    got, body = exchange(port, request)
    assert got == status and message in body, (case, got, body[:200])
    assert len(body) < 30_000  # never the request echoed back
    assert b"y" * (MAX_QUERY_CHARS + 1) not in body


def test_pipelined_requests_are_each_answered(port: int) -> None:
    """Requests sent back to back in one write (the second's head follows the first's in the same chunk) are
    each answered in turn, the head limit counting each head on its own."""
    one = b"GET /api/search?q=a+red+star&k=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 40_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(one + one + get(b"/healthz"))
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 3 and data.count(b'"rank":1') == 2, data[:300]


def test_serve_uses_the_bounded_server(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprompt.index.service import MAX_BATCH, MAX_QUEUE, default_threads, serve

    started: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))
    gc.unfreeze()
    try:
        serve(index_dir, port=8123, device="cpu", log_level="error")
        # what was loaded (torch, the model, the index) is kept out of the collector's full passes
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    (config,) = started
    assert config.http is http_protocol() and config.h11_max_incomplete_event_size == MAX_HEAD_BYTES
    assert config.http is http_protocol(PROTOCOLS[-1])  # httptools, the faster parser, wherever it is installed
    with pytest.raises(ConfigError, match="unknown HTTP protocol 'h2'"):
        http_protocol("h2")
    assert config.loop == event_loop()
    assert (config.host, config.port) == ("127.0.0.1", 8123)
    batcher = config.app.state.batcher
    assert (batcher.max_queue, batcher.max_batch, batcher.threads) == (MAX_QUEUE, MAX_BATCH, default_threads())
    try:
        serve(index_dir, device="cpu", log_level="error", max_queue=5, max_batch=3, threads=2)
    finally:
        gc.unfreeze()
    batcher = started[1].app.state.batcher
    assert (batcher.max_queue, batcher.max_batch, batcher.threads) == (5, 3, 2)


def test_answers_leave_at_once(live: tuple[Any, int]) -> None:
    """Nagle's algorithm is off on every connection, also when the listening socket came from outside: an answer
    is two writes, and with Nagle on the second waits for the client's delayed acknowledgement of the first."""
    server, port = live
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert conn.recv(1 << 16).startswith(b"HTTP/1.1 200")
        (mine,) = [p for p in server.server_state.connections
                   if p.transport.get_extra_info("peername") == conn.getsockname()]  # fmt: skip
        served = mine.transport.get_extra_info("socket")
        assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_client_gone_before_the_close_is_no_server_error() -> None:
    """Closing after an answer to a client that has already disconnected: write_eof fails (ENOTCONN), and the
    connection is closed without lingering instead of raising inside the server."""
    from vlprompt.index.service import _LingeringTransport

    class Gone:
        closed = False

        def is_closing(self) -> bool:
            return self.closed

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            raise OSError(107, "Transport endpoint is not connected")

        def resume_reading(self) -> None:
            raise AssertionError("there is nobody to linger for")

        def close(self) -> None:
            self.closed = True

    loop = asyncio.new_event_loop()
    try:
        gone = Gone()
        transport = _LingeringTransport(gone, loop)  # type: ignore[arg-type]
        transport.close()
        assert gone.closed and transport.is_closing()
    finally:
        loop.close()


def test_the_load_benchmark_counts_answers_and_errors(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import serve_load

    targets = ["/api/search?q=a+red+star&k=2", "/thumb/999"]  # requests alternate: answered, 404
    result = asyncio.run(serve_load.load(port, targets, 3, 12, 60.0, 30.0))
    assert (result["answered"], result["errors"], result["error_kinds"]) == (6, 6, {"404": 6})
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["requests_per_s"] > 0


def test_event_loop_is_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    try:
        import uvloop  # noqa: F401

        assert event_loop() == "uvloop"
    except ImportError:
        assert event_loop() == "asyncio"
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert event_loop() == "asyncio"  # Windows, or the extra not installed: the standard loop, not an error
