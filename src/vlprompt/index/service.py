"""The search service: a Starlette app with one web page (type a query, see the top results as thumbnails).

Routes: ``/`` (the page; ``?q=TEXT&k=10`` or ``?like=ROW``), ``/api/search`` (the same as JSON), ``/thumb/ROW``
(a JPEG thumbnail of item ROW; a strip of frames for a video), ``/healthz``. The page is rendered on the server
and needs no JavaScript. Media are served only as thumbnails of index items, addressed by row number, and only
from inside the index's media root (:meth:`~vlprompt.index.search.SearchIndex.media_path`, real paths), so no
request can name a file.

Bad input gets a status and a message, never a server error: an empty or over-long query, a number of results
or a row that is not ASCII digits in range (400); an address longer than ``MAX_QUERY_BYTES`` (414) or a request
body (413), refused before any work; a request head over ``MAX_HEAD_BYTES`` or one that is not HTTP, refused by
the server's protocol (:func:`http_protocol`: 414, 431 or 400, then a lingering close so the client reads the
answer instead of a connection reset); an index whose cache was damaged after it was opened (503); a search when
``max_queue`` searches are already waiting (503 with ``Retry-After``). A page never echoes more than
``MAX_QUERY_CHARS`` characters of a query.

Many users at once: search requests are answered by one worker thread in micro-batches (:class:`QueryBatcher`):
the text queries that arrive while the encoder is busy share its next pass, and FAISS searches them together. The
queue of waiting queries is bounded; when it is full a request gets a 503 with a message and ``Retry-After``
instead of joining an ever longer backlog. The search routes are ``async`` and wait on the batch's future, so a
waiting request holds no thread: the bounded queue is the only place requests wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import html
import io
import logging
import os
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np

from vlprompt.errors import ConfigError, DataError
from vlprompt.index.search import Hit, SearchIndex

MAX_QUERY_CHARS = 1000
MAX_K = 100
#: Longest query string (percent-encoded) the app reads: 1000 characters of 4-byte UTF-8 take 12,000 bytes.
MAX_QUERY_BYTES = 16 * 1024
#: Longest request head (request line and headers) the server's protocol parses; browsers send about 1 KiB.
MAX_HEAD_BYTES = 64 * 1024
#: Largest request body accepted; every route is a GET and reads none.
MAX_BODY_BYTES = 1024
#: After a refused or final answer, what the client still sends is read and dropped for at most this long and
#: this much before the socket closes (closing on unread data resets the connection and loses the answer).
LINGER_SECONDS = 5.0
LINGER_BYTES = 16 * 1024 * 1024
K_CHOICES = (5, 10, 20, 50)
THUMB_SIZE = 160  # longest side of an image thumbnail, px
STRIP_HEIGHT = 72  # height of a video's frame strip, px
STRIP_FRAMES = 6
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
TOO_LONG = f"The address is too long. A query may have at most {MAX_QUERY_CHARS} characters."
#: Search queries that may wait for the encoder; one more is refused with a 503 (``vlprompt serve --max-queue``).
MAX_QUEUE = 64
#: Queries answered in one encoder pass at most (``vlprompt serve --max-batch``).
MAX_BATCH = 32
#: While other requests are in flight, how long the worker waits for them to join a batch (seconds).
GATHER_SECONDS = 0.002
#: Seconds a refused client is asked to wait (the Retry-After header of a 503).
RETRY_AFTER = 1
log = logging.getLogger("vlprompt.serve")


def import_starlette() -> Any:
    """Import starlette, or say which extra installs it."""
    try:
        import starlette
    except ImportError as err:
        raise ConfigError("the search service needs starlette and uvicorn: pip install 'vlprompt[serve]'") from err
    return starlette


# ---- queries ------------------------------------------------------------------------------------------
class QueryError(Exception):
    """A query the service refuses, with the message shown to the person."""


def ascii_int(text: str | None, max_digits: int = 9) -> int | None:
    """``text`` as a whole number written in ASCII digits 0-9 only (at most ``max_digits``), else None.

    ``int()`` and ``str.isdigit()`` also take other scripts' digits ("٣"), superscripts ("²"), signs, spaces and
    underscores; an address takes none of these.
    """
    if text is None or not 0 < len(text) <= max_digits or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def parse_k(k: str | None) -> int:
    """The number of results asked for, 1..MAX_K (10 when not given)."""
    if k in (None, ""):
        return 10
    value = ascii_int(k)
    if value is None or not 1 <= value <= MAX_K:
        raise QueryError(f"The number of results must be a whole number from 1 to {MAX_K}.")
    return value


def parse_row(like: str, index: SearchIndex) -> int:
    """The item number of a ``like=ROW`` query."""
    row = ascii_int(like)
    if row is None or row >= len(index):
        raise QueryError(f"'like' must be the number of an item in this index, from 0 to {len(index) - 1}.")
    return row


@dataclass(frozen=True)
class Query:
    """A checked query: a text, or the row of an item ("more like this"), and how many results it asks for."""

    k: int
    text: str | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.row is None):
            raise ValueError("a Query is a text or an item's row: give exactly one")

    @property
    def asked(self) -> str | int:
        """What :meth:`SearchIndex.search_many` takes: the text, or the item's row."""
        return self.text if self.text is not None else int(self.row)  # type: ignore[arg-type]


def parse_query(index: SearchIndex, q: str | None, k: str | None, like: str | None) -> Query:
    """The query a request's ``q``, ``k`` and ``like`` describe (``like`` wins), or a QueryError saying why not."""
    n = parse_k(k)
    if like not in (None, ""):
        return Query(n, row=parse_row(like, index))
    q = q or ""
    if len(q) > MAX_QUERY_CHARS:  # before stripping: what is echoed back must be within the limit too
        raise QueryError(
            f"The query is too long ({len(q)} characters). Please keep it under {MAX_QUERY_CHARS} characters; "
            f"the model reads only its first {index.max_query_tokens} tokens anyway."
        )
    text = q.strip()
    if not text:
        raise QueryError("The query is empty: type a few words describing what you are looking for.")
    return Query(n, text=text)


def answer_queries(index: SearchIndex, queries: Sequence[Query]) -> list[tuple[list[Hit], str]]:
    """Each query's hits and a note for the person (may be empty): the texts in one encoder pass
    (:meth:`SearchIndex.search_batch`), which also tells which texts were longer than the encoder reads."""
    found, cut = index.search_batch([q.asked for q in queries], [q.k for q in queries])
    note = f"The model reads only the first {index.max_query_tokens} tokens of a query; the rest was ignored."
    return [(hits, note if c else "") for hits, c in zip(found, cut)]


# ---- many users: one worker, micro-batches, a bounded queue ---------------------------------------------
class Busy(Exception):
    """The queue of waiting queries is full (or the service is stopping): the request is refused, not queued."""


class QueryBatcher:
    """Answers the queries of concurrent requests in batches, on one worker thread.

    :meth:`submit` puts a query in a queue of at most ``max_queue`` and returns a future. The worker takes what
    is queued (at most ``max_batch``) whenever it is free and answers it with :func:`answer_queries`: one encoder
    pass for the texts, one FAISS search per k. A query that finds the worker idle and nothing else in flight
    starts at once; when the last batch held more queries than are queued now (several clients are being
    served), the worker waits up to ``gather_s`` for them, so that clients whose answers just went out join the
    next batch instead of splitting the load into a small batch and a large one. The worker is the only thread
    that runs the encoder, its tokenizer and the FAISS index (none of them promises to be thread-safe), with
    ``threads`` torch and FAISS threads (None: their defaults).
    """

    def __init__(
        self,
        index: SearchIndex,
        max_queue: int = MAX_QUEUE,
        max_batch: int = MAX_BATCH,
        gather_s: float = GATHER_SECONDS,
        threads: int | None = None,
    ) -> None:
        for name, value in (("max_queue", max_queue), ("max_batch", max_batch), ("threads", threads)):
            if value is not None and int(value) < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        self.index, self.max_queue, self.max_batch = index, int(max_queue), int(max_batch)
        self.gather_s, self.threads = float(gather_s), threads
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest batches' sizes (diagnostics and tests)
        self._queue: deque[tuple[Query, Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last = 1

    def __len__(self) -> int:
        """Queries waiting for the worker (the batch it is answering not counted)."""
        return len(self._queue)

    def submit(self, query: Query) -> Future:
        """A future of ``query``'s hits and note; :class:`Busy` when ``max_queue`` queries are already waiting."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise Busy("The service is stopping; please try again in a moment.")
            if len(self._queue) >= self.max_queue:
                raise Busy(
                    f"The service is busy (its queue of {self.max_queue} waiting searches is full). "
                    f"Please try again in a moment."
                )
            self._queue.append((query, future))
            if self._thread is None:  # started with the first query: an app that never searches holds no thread
                self._thread = threading.Thread(target=self._work, name="vlprompt-search", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after its batch; queries still waiting are refused with :class:`Busy`."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for _, future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_exception(Busy("The service is stopping; please try again in a moment."))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _take(self) -> list[tuple[Query, Future]] | None:
        """The next batch (None once closed): waits for a query, then gathers briefly only under load."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            target = min(self._last, self.max_batch)
            if self.gather_s > 0 and len(self._queue) < target:
                self._cond.wait_for(lambda: len(self._queue) >= target or self._closed, self.gather_s)
            if self._closed:
                return None
            batch = []
            while self._queue and len(batch) < self.max_batch:
                query, future = self._queue.popleft()
                if future.set_running_or_notify_cancel():  # False: its request went away while it waited
                    batch.append((query, future))
            self._last = max(1, len(batch))
            return batch

    def _work(self) -> None:
        if self.threads is not None:  # per thread: torch's and FAISS's OpenMP settings belong to the calling thread
            import torch

            from vlprompt.index.build import import_faiss

            torch.set_num_threads(self.threads)
            import_faiss().omp_set_num_threads(self.threads)
        while (batch := self._take()) is not None:
            if batch:
                self.batch_sizes.append(len(batch))
                self._answer(batch)

    def _answer(self, batch: list[tuple[Query, Future]]) -> None:
        try:
            results = answer_queries(self.index, [query for query, _ in batch])
        except Exception as err:  # noqa: BLE001 - handed to the request that asked, which decides the status
            if len(batch) == 1:
                batch[0][1].set_exception(err)
            else:  # one query's failure (a damaged cache row) must not fail the others: answer each alone
                for one in batch:
                    self._answer([one])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)


def default_threads() -> int:
    """Torch threads for the query encoder: every core this process may use but one, which the event loop (HTTP,
    JSON) needs. On a small machine more threads than that made the encoder slower, not faster (README)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


# ---- thumbnails ---------------------------------------------------------------------------------------
def _jpeg(image: Any) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def render_thumbnail(path: Path, kind: str) -> bytes:
    """A JPEG thumbnail: the image scaled down, or a horizontal strip of a video's frames."""
    from PIL import Image

    from vlprompt.data.media import load_image
    from vlprompt.data.video import is_video_file, read_frames

    if kind == "video" or is_video_file(path.name) or path.is_dir():
        frames, mask = read_frames(path, STRIP_FRAMES, "uniform")
        frames = frames[: max(1, int(mask.sum()))].numpy()  # padding repeats the last frame: drop it
        h, w = frames.shape[1:3]
        width = max(1, round(w * STRIP_HEIGHT / h))
        tiles = [np.asarray(Image.fromarray(f).resize((width, STRIP_HEIGHT), Image.BILINEAR)) for f in frames]
        return _jpeg(Image.fromarray(np.concatenate(tiles, axis=1)))
    image = load_image(path)
    image.thumbnail((THUMB_SIZE, THUMB_SIZE))
    return _jpeg(image)


class ThumbnailCache:
    """Rendered thumbnails of the most recently shown rows."""

    def __init__(self, index: SearchIndex, max_items: int = 512) -> None:
        self.index, self.max_items = index, max_items
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: int) -> bytes | None:
        """The JPEG of item ``row``, or None when it has no media (or its media cannot be read)."""
        with self._lock:
            if row in self._items:
                self._items.move_to_end(row)
                return self._items[row]
        path = self.index.media_path(row)
        if path is None or not path.exists():
            return None
        item = self.index.items[row]
        try:
            data = render_thumbnail(path, item.get("visual") or item["kind"])
        except (DataError, OSError, ValueError):
            return None
        with self._lock:
            self._items[row] = data
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data


# ---- the page -----------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px}main{padding:16px 24px}
form{display:flex;gap:8px;margin-bottom:14px}input[type=search]{flex:1;font-size:16px;padding:8px;min-width:0}
select,button{font-size:16px;padding:8px}
.message{padding:10px 14px;border-radius:6px;margin-bottom:14px;background:#e8eefc}
.message.error{background:#fde8e8;color:#8a1c1c}.message.note{background:#fff6dc}
.results{display:flex;flex-wrap:wrap;gap:12px;list-style:none;padding:0;margin:0}
.result{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;padding:8px;width:180px;font-size:13px}
.result.video{width:auto;max-width:100%}.result img{display:block;max-width:100%;margin-bottom:6px}
.result.image img{width:164px;height:auto}
.score{font-weight:600}.rank{color:#6b7280}.caption{margin:4px 0;overflow-wrap:anywhere}
.id{color:#6b7280;font-size:11px;overflow-wrap:anywhere}a{color:#2350c8}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _card(hit: Hit, k: int) -> str:
    item = hit.item
    kind = item.get("visual") or item["kind"]
    caption = item.get("text") or next(iter(item.get("captions") or []), "")
    alt = caption or item["id"]
    like = urlencode({"like": hit.row, "k": k})
    return (
        f'<li class="result {_e(kind)}" data-row="{hit.row}">'
        f'<img src="/thumb/{hit.row}" alt="{_e(alt)}" loading="lazy">'
        f'<div><span class="rank">#{hit.rank}</span> <span class="score">{hit.score:.4f}</span></div>'
        + (f'<div class="caption">{_e(caption)}</div>' if caption else "")
        + f'<div class="id">{_e(item["id"])}</div><a href="/?{like}">more like this</a></li>'
    )


def render_page(
    index: SearchIndex, q: str, k: int, hits: list[Hit], message: str = "", kind: str = "info", like: int | None = None
) -> str:
    """The whole HTML page; at most ``MAX_QUERY_CHARS`` characters of ``q`` are shown."""
    q = q[:MAX_QUERY_CHARS]
    m = index.manifest
    about = (
        f"{len(index)} {'/'.join(m.get('kinds', []))} items · {m['index']['kind']} index · "
        f"model {m['model'].get('target')}"
    )
    options = "".join(f'<option value="{c}"{" selected" if c == k else ""}>{c}</option>' for c in K_CHOICES)
    if k not in K_CHOICES:
        options += f'<option value="{k}" selected>{k}</option>'
    heading = ""
    if like is not None and 0 <= like < len(index):
        heading = f'<p class="message">Items most similar to item {like} ({_e(index.items[like]["id"])}).</p>'
    box = f'<div class="message {kind}" role="status">{_e(message)}</div>' if message else ""
    results = f'<ol class="results">{"".join(_card(h, k) for h in hits)}</ol>' if hits else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(q + ' · ' if q else '')}vlprompt search</title><style>{STYLE}</style></head><body>"
        f"<header><h1>vlprompt search</h1><p>{_e(about)}</p></header><main>"
        '<form method="get" action="/" role="search">'
        f'<input type="search" name="q" value="{_e(q)}" placeholder="describe what you are looking for" '
        'aria-label="query" autofocus>'
        f'<select name="k" aria-label="number of results">{options}</select><button type="submit">Search</button>'
        f"</form>{heading}{box}{results}</main></body></html>"
    )


# ---- the app ------------------------------------------------------------------------------------------
def _too_large(scope: dict[str, Any]) -> tuple[int, str] | None:
    """Status and message for a request over the size limits (checked before any work), else None."""
    if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        return 414, TOO_LONG
    headers = dict(scope.get("headers", []))
    length = headers.get(b"content-length", b"0").strip()
    # bytes.isdigit() is ASCII-only; the length bound keeps int() away from a thousand-digit header
    declared = int(length) if length.isdigit() and len(length) <= 9 else None
    if b"transfer-encoding" in headers or declared is None or declared > MAX_BODY_BYTES:
        return 413, f"This service reads no request body (over {MAX_BODY_BYTES} bytes): a query goes in the address."
    return None


class _Limits:
    """ASGI middleware: a request over the size limits is refused before any work (and its connection closed:
    an unread body is not drained on a keep-alive connection); every answer gets the security headers.

    Plain ASGI rather than ``@app.middleware("http")``, whose wrapper costs a task and a stream per request.
    """

    def __init__(self, app: Any, refusal: Any) -> None:
        from starlette.datastructures import MutableHeaders

        self.app, self.refusal, self._headers = app, refusal, MutableHeaders

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self._headers(scope=message).update(SECURITY_HEADERS)
            await send(message)

        too_large = _too_large(scope)
        if too_large is None:
            await self.app(scope, receive, send_with_headers)
        else:
            response = self.refusal(scope["path"], *too_large, headers={"Connection": "close"})
            await response(scope, receive, send_with_headers)


@dataclass
class Answer:
    """What a search request gets: status, hits, the message shown with them (and its kind), extra headers."""

    status: int
    hits: list[Hit]
    message: str = ""
    kind: str = "info"
    headers: dict[str, str] | None = None


def create_app(
    index: SearchIndex,
    max_queue: int = MAX_QUEUE,
    max_batch: int = MAX_BATCH,
    threads: int | None = None,
    gather_s: float = GATHER_SECONDS,
) -> Any:
    """The Starlette app serving ``index``; searches go through a :class:`QueryBatcher` (``app.state.batcher``).

    Plain Starlette routes: every parameter is a string checked here (:func:`parse_query`), so a framework's
    validation layer would only add work to each request (FastAPI's cost about 50 us of the ~1 ms per search).
    """
    import_starlette()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    batcher = QueryBatcher(index, max_queue, max_batch, gather_s, threads)
    thumbs = ThumbnailCache(index)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        batcher.close()  # the server is stopping: refuse what still waits, let the worker finish its batch

    def refusal(path: str, status: int, message: str, **kwargs: Any) -> Response:
        """``message`` in the form the route speaks: JSON for the API, the page for ``/``, else plain text."""
        if path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status, **kwargs)
        if path == "/":
            return HTMLResponse(render_page(index, "", 10, [], message, "error"), status_code=status, **kwargs)
        return PlainTextResponse(message, status_code=status, **kwargs)

    async def answer(q: str | None, k: str | None, like: str | None) -> Answer:
        try:
            query = parse_query(index, q, k, like)
            hits, note = await asyncio.wrap_future(batcher.submit(query))
        except QueryError as err:
            return Answer(400, [], str(err), "error")
        except Busy as err:
            return Answer(503, [], str(err), "error", {"Retry-After": str(RETRY_AFTER)})
        except DataError as err:
            # the index was damaged after it was opened (its checks passed then): the operator's problem, named
            # in the server log; the person is told the service cannot answer rather than shown a path
            log.error("cannot answer a query: %s", err)
            return Answer(503, [], "The index cannot be read right now (it is damaged); the server log says why.",
                          "error")  # fmt: skip
        return Answer(200, hits, note, "note" if note else "info")

    async def page(request: Request) -> HTMLResponse:
        q, k, like = (request.query_params.get(name) for name in ("q", "k", "like"))
        try:
            n = parse_k(k)
        except QueryError:
            n = 10
        if q is None and like in (None, "") and k is None:
            hint = f'Type a description (for example "a red star") and press Search to search {len(index)} items.'
            return HTMLResponse(render_page(index, "", n, [], hint))
        got = await answer(q, k, like)
        like_row = ascii_int(like) if got.status == 200 else None
        body = render_page(index, q or "", n, got.hits, got.message, got.kind, like_row)
        return HTMLResponse(body, status_code=got.status, headers=got.headers)

    async def api(request: Request) -> JSONResponse:
        q, k, like = (request.query_params.get(name) for name in ("q", "k", "like"))
        got = await answer(q, k, like)
        if got.status != 200:
            return JSONResponse({"error": got.message}, status_code=got.status, headers=got.headers)
        results = [{**h.as_dict(), "thumbnail": f"/thumb/{h.row}"} for h in got.hits]
        row = ascii_int(like)  # a like=ROW query ignores q, so q was not checked: it is not echoed either
        return JSONResponse({"query": q if row is None else None, "like": row, "note": got.message,
                             "results": results})  # fmt: skip

    def thumb(request: Request) -> Response:  # sync: rendering runs in the thread pool, off the event loop
        n = ascii_int(request.path_params["row"])
        data = thumbs.get(n) if n is not None else None
        if data is None:
            return Response("no thumbnail for this item", status_code=404, media_type="text/plain")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)  # browsers ask for one; no icon is better than a logged 404

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "items": len(index), "index": index.kind})

    routes = [Route("/", page), Route("/api/search", api), Route("/thumb/{row}", thumb),
              Route("/favicon.ico", favicon), Route("/healthz", health)]  # fmt: skip
    app = Starlette(routes=routes, middleware=[Middleware(_Limits, refusal=refusal)], lifespan=lifespan)
    app.state.batcher = batcher
    return app


# ---- the server ---------------------------------------------------------------------------------------
REFUSALS = {
    400: "This is not a valid HTTP request.",
    414: TOO_LONG,
    431: f"The request headers are too large (the request head may take at most {MAX_HEAD_BYTES} bytes).",
}


def _refusal_status(buffered: bytes) -> int:
    """The status for a request h11 refused, from the bytes it could not parse: 414 when the request line itself
    is over ``MAX_HEAD_BYTES``, 431 when the headers are, else 400 (not HTTP)."""
    if len(buffered) <= MAX_HEAD_BYTES:
        return 400
    return 414 if b"\n" not in buffered.lstrip(b"\r\n")[:MAX_HEAD_BYTES] else 431


def refusal_bytes(status: int) -> bytes:
    """A whole HTTP answer refusing a request head with ``status`` (400, 414 or 431) and the message saying why."""
    text = REFUSALS[status].encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(text)}\r\nconnection: close\r\nx-content-type-options: nosniff\r\n\r\n"
    )
    return head.encode() + text


class _LingeringTransport:
    """A transport whose ``close()`` lingers: it sends the end of the stream, then reads and drops what the
    client still sends until the client closes or ``LINGER_SECONDS``/``LINGER_BYTES`` run out. Closing a
    socket with unread data makes the kernel send a reset, which destroys the answer before the client reads
    it; that is how a 1 MB query ended. Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self.lingering = False
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        self.lingering = True
        try:
            if self._transport.can_write_eof():
                self._transport.write_eof()  # after the pending answer
        except OSError:  # the client has gone already (ENOTCONN): there is nobody to linger for
            self._transport.close()
            return
        self._transport.resume_reading()  # flow control may have paused reading
        self._timer = self._loop.call_later(LINGER_SECONDS, self._transport.close)

    def drop(self, data: bytes) -> None:
        """Data received while lingering: dropped, up to ``LINGER_BYTES``."""
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self._transport.close()

    def close_now(self) -> None:
        """Close without lingering (the server is stopping)."""
        self._transport.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once on a TCP connection (TCP_NODELAY).

    An answer leaves as two writes, head then body; with Nagle's algorithm on, the body waits for the client to
    acknowledge the head, which a client delays by milliseconds: a few requests per connection per 10 ms at most.
    asyncio turns Nagle off only on sockets it creates itself, not on a listening socket handed to the server
    (uvicorn's ``sockets=`` or ``--fd``).
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Bounded:
    """What both HTTP protocols add to uvicorn's: Nagle off, lingering closes (:class:`_LingeringTransport`),
    and a refused request head answered with :func:`refusal_bytes` instead of a bare 400."""

    transport: Any
    loop: asyncio.AbstractEventLoop
    logger: logging.Logger

    def connection_made(self, transport: asyncio.Transport) -> None:
        set_nodelay(transport)
        super().connection_made(_LingeringTransport(transport, self.loop))  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            self.transport.drop(data)
        else:
            super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def shutdown(self) -> None:
        if self.transport.lingering:  # the server is stopping: it need not wait for this client
            self.transport.close_now()
        else:
            super().shutdown()  # type: ignore[misc]

    def refuse(self, status: int) -> None:
        self.logger.warning("refused a request: %s", REFUSALS[status])
        self.transport.write(refusal_bytes(status))
        self.transport.close()


_PROTOCOLS: dict[str, type] = {}


def http_protocol(kind: str | None = None) -> type:
    """uvicorn's HTTP protocol, bounded (:class:`_Bounded`): ``"httptools"`` (its C parser; the default where it
    is installed, as with the ``serve`` extra) or ``"h11"`` (pure Python, slower). A request head over
    ``MAX_HEAD_BYTES`` gets a 414 (the request line) or 431 (the headers), bytes that are not HTTP a 400."""
    if kind is None:
        try:
            import httptools  # noqa: F401

            kind = "httptools"
        except ImportError:
            kind = "h11"
    makers = {"httptools": _httptools_protocol, "h11": _h11_protocol}
    if kind not in makers:
        raise ConfigError(f"unknown HTTP protocol {kind!r}: choose one of {sorted(makers)}")
    if kind not in _PROTOCOLS:
        _PROTOCOLS[kind] = makers[kind]()
    return _PROTOCOLS[kind]


def _h11_protocol() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(_Bounded, H11Protocol):  # type: ignore[misc]
        """h11 bounds the head itself (``h11_max_incomplete_event_size``, :func:`server_config`)."""

        def send_400_response(self, msg: str) -> None:
            self.refuse(_refusal_status(self.conn.trailing_data[0]))

    return BoundedH11Protocol


def _httptools_protocol() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(_Bounded, HttpToolsProtocol):  # type: ignore[misc]
        """httptools parses a head of any length: the bytes of the head being read are counted here, and at most
        ``MAX_HEAD_BYTES`` of them reach the parser before the request is refused. Counting is per chunk
        received: a pipelined head that begins in the chunk which ended the previous head is counted from the
        next chunk on (at most twice the limit is read into it)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_bytes, self._in_head, self._line_done, self._heads = 0, True, False, 0
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if not self._in_head or self.transport.lingering:
                super().data_received(data)
                return
            room = MAX_HEAD_BYTES - self._head_bytes
            fits, heads = data[:room], self._heads
            self._head_bytes += len(fits)
            self._line_done = self._line_done or b"\n" in fits
            super().data_received(fits)
            if len(data) <= room or self.transport.is_closing():  # all read, or refused by the parser (not HTTP)
                return
            if self._in_head and self._heads == heads:  # one head goes on past the limit
                self.refuse(431 if self._line_done else 414)
            else:  # a head ended within the limit: the rest is its body or the next request
                self.data_received(data[room:])

        def on_headers_complete(self) -> None:
            self._head_bytes, self._in_head, self._line_done = 0, False, False
            self._heads += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True  # what comes next is the next request's head
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            self.refuse(400)

    return BoundedHttpToolsProtocol


def import_uvicorn() -> Any:
    """Import uvicorn, or say which extra installs it."""
    try:
        import uvicorn
    except ImportError as err:
        raise ConfigError("the search service needs starlette and uvicorn: pip install 'vlprompt[serve]'") from err
    return uvicorn


def event_loop() -> str:
    """uvicorn's event loop: ``uvloop`` where it is installed (the ``serve`` extra, not on Windows), else asyncio's.

    The event loop thread parses HTTP and writes JSON for every request while the worker encodes: on the embedded
    model with 8 clients uvloop cut the service's CPU time per answered request by about a fifth (README).
    """
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def server_config(
    app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", http: str | None = None
) -> Any:
    """The uvicorn config that serves ``app``: the fastest bounded protocol installed (:func:`http_protocol`;
    ``http`` names one) and its head limit, the fastest event loop installed (:func:`event_loop`) and no
    WebSocket upgrades (the app has no such route)."""
    return import_uvicorn().Config(
        app, host=host, port=port, log_level=log_level, http=http_protocol(http), loop=event_loop(),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES, ws="none",
    )  # fmt: skip


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    media_root: str | None = None,
    log_level: str = "info",
    max_queue: int = MAX_QUEUE,
    max_batch: int = MAX_BATCH,
    threads: int | None = None,
) -> None:
    """Load ``index_dir`` (its caches checked: a damaged one is refused here) and serve it until interrupted.

    ``max_queue`` and ``max_batch`` bound the waiting queries and a batch (:class:`QueryBatcher`); ``threads``
    is the encoder's torch threads (None: :func:`default_threads`).
    """
    import_starlette()
    uvicorn = import_uvicorn()
    index = SearchIndex(index_dir, device, media_root=media_root)
    app = create_app(index, max_queue, max_batch, threads if threads is not None else default_threads())
    # What is loaded now (torch, the model, the index: about half a million objects) lives as long as the server;
    # left to the cyclic collector, every full collection walks all of it and stops every request for ~0.3 s.
    gc.collect()
    gc.freeze()
    uvicorn.Server(server_config(app, host, port, log_level)).run()
