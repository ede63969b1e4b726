"""The search service behind a real uvicorn server on 127.0.0.1, set up as ``vlprompt serve`` sets it up
(:func:`~vlprompt.index.service.server_config`): over-long addresses, headers and bodies, and bytes that are not
HTTP, get a status and a message that the client reads, instead of a connection reset."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from vlprompt.index.service import MAX_HEAD_BYTES, MAX_QUERY_CHARS, create_app, http_protocol, server_config  # noqa: E402


@pytest.fixture(scope="module")
def port(index: Any) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server takes over this socket: no race for the port
    server = uvicorn.Server(server_config(create_app(index), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


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
}


@pytest.mark.parametrize("case", list(CASES))
def test_requests_of_any_size_get_a_status_and_a_message(port: int, case: str) -> None:
    request, status, message = CASES[case]
    got, body = exchange(port, request)
    assert got == status and message in body, (case, got, body[:200])
    assert len(body) < 30_000  # never the request echoed back
    assert b"y" * (MAX_QUERY_CHARS + 1) not in body


def test_serve_uses_the_bounded_server(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprompt.index.service import serve

    started: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))
    serve(index_dir, port=8123, device="cpu", log_level="error")
    (config,) = started
    assert config.http is http_protocol() and config.h11_max_incomplete_event_size == MAX_HEAD_BYTES
    assert (config.host, config.port) == ("127.0.0.1", 8123)
