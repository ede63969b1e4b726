"""The search service: a FastAPI app with one web page (type a query, see the top results as thumbnails).

Routes: ``/`` (the page; ``?q=TEXT&k=10`` or ``?like=ROW``), ``/api/search`` (the same as JSON), ``/thumb/ROW``
(a JPEG thumbnail of item ROW; a strip of frames for a video), ``/healthz``. The page is rendered on the server
and needs no JavaScript. Media are served only as thumbnails of index items, addressed by row number, and only
from inside the index's media root (:meth:`~vlprompt.index.search.SearchIndex.media_path`), so no request can
name a file. An empty or over-long query gets a clear message (HTTP 400), never a server error.
"""

from __future__ import annotations

import html
import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np

from vlprompt.errors import ConfigError, DataError
from vlprompt.index.search import Hit, SearchIndex

MAX_QUERY_CHARS = 1000
MAX_K = 100
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


def import_fastapi() -> Any:
    """Import fastapi, or say which extra installs it."""
    try:
        import fastapi
    except ImportError as err:
        raise ConfigError("the search service needs fastapi and uvicorn: pip install 'vlprompt[serve]'") from err
    return fastapi


# ---- queries ------------------------------------------------------------------------------------------
class QueryError(Exception):
    """A query the service refuses, with the message shown to the person."""


def parse_k(k: str | None) -> int:
    """The number of results asked for, 1..MAX_K."""
    try:
        value = int(k) if k not in (None, "") else 10
    except ValueError:
        raise QueryError(f"The number of results must be a whole number from 1 to {MAX_K}.") from None
    if not 1 <= value <= MAX_K:
        raise QueryError(f"The number of results must be a whole number from 1 to {MAX_K}.")
    return value


def run_query(index: SearchIndex, q: str | None, k: str | None, like: str | None) -> tuple[list[Hit], str]:
    """Hits for a text query or a ``like=ROW`` query, and a note for the person (may be empty)."""
    n = parse_k(k)
    if like not in (None, ""):
        try:
            row = int(like)
        except ValueError:
            raise QueryError("'like' must be the number of an item in this index.") from None
        if not 0 <= row < len(index):
            raise QueryError(f"There is no item {row} in this index (it has {len(index)} items).")
        return index.search_like(row, n), ""
    text = (q or "").strip()
    if not text:
        raise QueryError("The query is empty: type a few words describing what you are looking for.")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(
            f"The query is too long ({len(text)} characters). Please keep it under {MAX_QUERY_CHARS} characters; "
            f"the model reads only its first {index.max_query_tokens} tokens anyway."
        )
    tokens = index.query_tokens(text)
    note = ""
    if tokens is not None and tokens > index.max_query_tokens:
        note = f"The model reads only the first {index.max_query_tokens} tokens of a query; the rest was ignored."
    return index.search(text, n), note


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
    """The whole HTML page."""
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
def create_app(index: SearchIndex) -> Any:
    """The FastAPI app serving ``index``."""
    fastapi = import_fastapi()
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = fastapi.FastAPI(title="vlprompt search", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one query at a time through the encoder
    thumbs = ThumbnailCache(index)

    @app.middleware("http")
    async def security_headers(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def answer(q: str | None, k: str | None, like: str | None) -> tuple[int, list[Hit], str, str]:
        try:
            with lock:
                hits, note = run_query(index, q, k, like)
        except QueryError as err:
            return 400, [], str(err), "error"
        return 200, hits, note, "note" if note else "info"

    @app.get("/", response_class=HTMLResponse)
    def page(q: str | None = None, k: str | None = None, like: str | None = None) -> HTMLResponse:
        try:
            n = parse_k(k)
        except QueryError:
            n = 10
        if q is None and like in (None, "") and k is None:
            hint = f'Type a description (for example "a red star") and press Search to search {len(index)} items.'
            return HTMLResponse(render_page(index, "", n, [], hint))
        status, hits, message, kind = answer(q, k, like)
        like_row = int(like) if like not in (None, "") and status == 200 else None
        return HTMLResponse(render_page(index, q or "", n, hits, message, kind, like_row), status_code=status)

    @app.get("/api/search")
    def api(q: str | None = None, k: str | None = None, like: str | None = None) -> JSONResponse:
        status, hits, message, _ = answer(q, k, like)
        if status != 200:
            return JSONResponse({"error": message}, status_code=status)
        results = [{**h.as_dict(), "thumbnail": f"/thumb/{h.row}"} for h in hits]
        return JSONResponse({"query": q, "like": like, "note": message, "results": results})

    @app.get("/thumb/{row}")
    def thumb(row: str) -> Response:
        data = thumbs.get(int(row)) if row.isdigit() else None
        if data is None:
            return Response("no thumbnail for this item", status_code=404, media_type="text/plain")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # browsers ask for one; no icon is better than a logged 404

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {"ok": True, "items": len(index), "index": index.kind}

    return app


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    media_root: str | None = None,
    log_level: str = "info",
) -> None:
    """Load ``index_dir`` and serve it with uvicorn until interrupted."""
    import_fastapi()
    try:
        import uvicorn
    except ImportError as err:
        raise ConfigError("the search service needs fastapi and uvicorn: pip install 'vlprompt[serve]'") from err
    app = create_app(SearchIndex(index_dir, device, media_root=media_root))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
