"""Many users at once: queries searched together get the hits each gets alone, concurrent requests share one
encoder pass, a full queue is a 503 with a message and Retry-After, and a lone query never waits for company.

The encoder is wrapped in a gate (:class:`Gate`) that holds the first pass until the test opens it, so which
queries end up in which batch is decided by the test, not by thread timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("starlette")
pytest.importorskip("httpx")  # TestClient

from starlette.testclient import TestClient  # noqa: E402

from vlprompt.errors import ConfigError, DataError  # noqa: E402
from vlprompt.index.search import Hit, SearchIndex  # noqa: E402
from vlprompt.index.service import Busy, Query, QueryBatcher, create_app  # noqa: E402

MARGIN = 1e-4  # score gaps this wide cannot be closed by float rounding (about 1e-7 here)


class Gate:
    """Stands in for ``SearchIndex.encode_texts``: records the texts of every pass; while shut, a pass waits."""

    def __init__(self, encode: Callable[[list[str]], Any]) -> None:
        self.encode = encode
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, texts: list[str]) -> Any:
        self.calls.append(list(texts))
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"
        return self.encode(texts)


@pytest.fixture
def gate(index: SearchIndex, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate(index.encode_texts)
    monkeypatch.setattr(index, "encode_texts", g)
    yield g
    g.open.set()  # never leave a worker waiting


@pytest.fixture
def batchers() -> Iterator[list[QueryBatcher]]:
    """Batchers a test makes; their workers are stopped afterwards."""
    made: list[QueryBatcher] = []
    yield made
    for b in made:
        b.close()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def texts(index: SearchIndex) -> list[str]:
    """Captions whose top 11 scores are all at least MARGIN apart: their order cannot depend on rounding."""
    chosen = []
    for item in index.items:
        for caption in item["captions"][:2]:
            scores = [h.score for h in index.search(caption, 11)]
            if min(-np.diff(scores)) > MARGIN:
                chosen.append(caption)
    assert len(chosen) >= 8, "the small world should give well-separated scores"
    return chosen[:8]


def assert_same_hits(got: list[Hit], alone: list[Hit]) -> None:
    """The same rows in the same order, scores equal up to float rounding."""
    assert [(h.rank, h.row) for h in got] == [(h.rank, h.row) for h in alone]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in alone], rtol=0, atol=1e-5)
    assert [h.item for h in got] == [h.item for h in alone]


# ---- SearchIndex.search_many ------------------------------------------------------------------------------
def test_search_many_gives_each_query_its_hits_alone_in_one_encoder_pass(
    index: SearchIndex, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queries: list[str | int] = [texts[0], 3, texts[1], texts[2], 7, texts[3], texts[1]]
    ks = [5, 4, 10, 1, 20, 3, 2]
    passes: list[list[str]] = []
    encode = index.encode_texts
    monkeypatch.setattr(index, "encode_texts", lambda t: passes.append(list(t)) or encode(t))
    together = index.search_many(queries, ks)
    assert passes == [[texts[0], texts[1], texts[2], texts[3], texts[1]]]  # one pass, in order
    monkeypatch.undo()
    for query, k, got in zip(queries, ks, together):
        alone = index.search(query, k) if isinstance(query, str) else index.search_like(query, k)
        assert len(got) == min(k, len(index))
        assert_same_hits(got, alone)
    assert together[4][0].row == 7  # an item is its own best match
    assert [len(h) for h in index.search_many(texts[:3], 2)] == [2, 2, 2]  # one k for all


def test_search_many_checks_its_arguments(index: SearchIndex) -> None:
    with pytest.raises(ValueError, match="2 queries but 3 values of k"):
        index.search_many(["a red star", 1], [1, 2, 3])
    for row in (20, -1):
        with pytest.raises(DataError, match=rf"no item {row} in this index \(0..19\)"):
            index.search_many(["a red star", row], 3)
    assert index.search_many([], 3) == []


def test_the_encoder_pass_tells_which_texts_were_cut(index: SearchIndex) -> None:
    texts = [" ".join(["star"] * n) for n in range(26, 36)]
    counts = [index.query_tokens(t) for t in texts]
    assert index.max_query_tokens in counts  # one text fills the context exactly: end-of-text last, yet not cut
    _, cut = index.encode_texts(texts)
    assert cut == [n > index.max_query_tokens for n in counts] and True in cut and False in cut
    hits, cut = index.search_batch([texts[0], 4, texts[-1]], 2)
    assert cut == [False, False, True] and [len(h) for h in hits] == [2, 2, 2]


# ---- the batcher ----------------------------------------------------------------------------------------
def test_queries_that_wait_share_the_next_encoder_pass(
    index: SearchIndex, gate: Gate, texts: list[str], batchers: list[QueryBatcher]
) -> None:
    batcher = QueryBatcher(index)
    batchers.append(batcher)
    queries = [Query(5, text=texts[0]), Query(3, text=texts[1]), Query(4, row=2), Query(10, text=texts[2])]
    first = batcher.submit(queries[0])
    assert gate.entered.wait(30)  # the worker is inside the encoder with the first query alone
    waiting = [batcher.submit(q) for q in queries[1:]]
    gone = batcher.submit(Query(5, text="a query whose request went away"))
    assert gone.cancel()
    queries.append(Query(3, text=texts[3]))
    waiting.append(batcher.submit(queries[-1]))
    assert len(batcher) == 5
    gate.open.set()
    answers = [f.result(60) for f in (first, *waiting)]
    assert gate.calls == [[texts[0]], [texts[1], texts[2], texts[3]]]  # the cancelled one is not encoded
    assert list(batcher.batch_sizes) == [1, 4]
    for (hits, note), query in zip(answers, queries):
        alone = index.search(query.text, query.k) if query.text else index.search_like(query.row or 0, query.k)
        assert_same_hits(hits, alone)
        assert note == ""


def test_one_failing_query_does_not_fail_its_batch(
    index: SearchIndex, gate: Gate, texts: list[str], batchers: list[QueryBatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    search_batch = index.search_batch

    def damaged(queries: list, k: Any) -> Any:  # item 3's cache row cannot be read
        if 3 in queries:
            raise DataError("feature cache: shard_00000.npy is damaged")
        return search_batch(queries, k)

    monkeypatch.setattr(index, "search_batch", damaged)
    batcher = QueryBatcher(index)
    batchers.append(batcher)
    first = batcher.submit(Query(2, text=texts[0]))
    assert gate.entered.wait(30)
    bad, good = batcher.submit(Query(2, row=3)), batcher.submit(Query(2, text=texts[1]))
    gate.open.set()
    assert len(first.result(60)[0]) == 2
    with pytest.raises(DataError, match="damaged"):
        bad.result(60)
    assert_same_hits(good.result(60)[0], index.search(texts[1], 2))
    assert list(batcher.batch_sizes) == [1, 2]  # tried together, then each alone


def test_a_full_queue_refuses_and_closing_refuses_the_waiting(
    index: SearchIndex, gate: Gate, batchers: list[QueryBatcher]
) -> None:
    batcher = QueryBatcher(index, max_queue=2)
    batchers.append(batcher)
    running = batcher.submit(Query(3, text="a red star"))
    assert gate.entered.wait(30)
    queued = [batcher.submit(Query(3, row=r)) for r in (1, 2)]
    with pytest.raises(Busy, match=r"The service is busy \(its queue of 2 waiting searches is full\)"):
        batcher.submit(Query(3, row=4))
    assert len(batcher) == 2  # the refused one is not queued
    closer = threading.Thread(target=batcher.close)  # close() waits for the batch in progress
    closer.start()
    wait_until(lambda: all(f.done() for f in queued))
    for future in queued:
        with pytest.raises(Busy, match="stopping"):
            future.result(0)
    gate.open.set()
    closer.join(60)
    assert not closer.is_alive() and len(running.result(60)[0]) == 3  # the batch in progress was answered
    with pytest.raises(Busy, match="stopping"):
        batcher.submit(Query(3, row=1))


def test_a_lone_query_starts_at_once_and_only_load_gathers(
    index: SearchIndex, gate: Gate, texts: list[str], batchers: list[QueryBatcher]
) -> None:
    batcher = QueryBatcher(index, gather_s=30.0)
    batchers.append(batcher)
    gate.open.set()
    start = time.monotonic()
    batcher.submit(Query(3, text=texts[0])).result(60)
    assert time.monotonic() - start < 10  # not the 30 s gather window: nothing else was in flight
    gate.open.clear()
    gate.entered.clear()
    first = batcher.submit(Query(3, text=texts[1]))
    assert gate.entered.wait(30)
    three = [batcher.submit(Query(3, text=t)) for t in texts[2:5]]
    gate.open.set()
    for f in (first, *three):
        f.result(60)
    assert list(batcher.batch_sizes) == [1, 1, 3]
    # three clients were being served: a query arriving alone now waits (up to gather_s) for the others
    batcher.gather_s = 3.0
    pair = [batcher.submit(Query(3, text=texts[5]))]
    time.sleep(0.2)
    assert len(batcher) == 1 and len(gate.calls) == 3  # still waiting for company
    pair.append(batcher.submit(Query(3, text=texts[6])))
    for f in pair:
        f.result(60)
    assert gate.calls[-1] == texts[5:7] and list(batcher.batch_sizes) == [1, 1, 3, 2]


def test_batcher_settings_are_checked(index: SearchIndex) -> None:
    for kwargs, message in (({"max_queue": 0}, "max_queue must be at least 1, got 0"),
                            ({"max_batch": -1}, "max_batch must be at least 1, got -1"),
                            ({"threads": 0}, "threads must be at least 1, got 0")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            QueryBatcher(index, **kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        Query(3, text="a red star", row=2)
    with pytest.raises(ValueError, match="exactly one"):
        Query(3)


def test_max_batch_bounds_a_pass(
    index: SearchIndex, gate: Gate, texts: list[str], batchers: list[QueryBatcher]
) -> None:
    batcher = QueryBatcher(index, max_batch=2)
    batchers.append(batcher)
    first = batcher.submit(Query(1, text=texts[0]))
    assert gate.entered.wait(30)
    rest = [batcher.submit(Query(1, text=t)) for t in texts[1:6]]
    gate.open.set()
    for f in (first, *rest):
        f.result(60)
    assert list(batcher.batch_sizes) == [1, 2, 2, 1] and gate.calls[1:] == [texts[1:3], texts[3:5], texts[5:6]]


# ---- through the app ------------------------------------------------------------------------------------
def test_concurrent_requests_share_a_pass_and_get_their_own_answers(
    index: SearchIndex, gate: Gate, texts: list[str]
) -> None:
    app = create_app(index)
    with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
        batcher = app.state.batcher
        asks = [{"q": texts[0], "k": "4"}, {"q": texts[1], "k": "3"}, {"like": "5", "k": "2"},
                {"q": texts[2], "k": "5"}, {"q": texts[3], "k": "3"}]  # fmt: skip
        first = pool.submit(client.get, "/api/search", params=asks[0])
        assert gate.entered.wait(30)
        rest = [pool.submit(client.get, "/api/search", params=p) for p in asks[1:]]
        wait_until(lambda: len(batcher) == 4)
        gate.open.set()
        answers = [f.result(60) for f in (first, *rest)]
    assert list(batcher.batch_sizes) == [1, 4] and sorted(gate.calls[1]) == sorted(texts[1:4])
    for params, response in zip(asks, answers):
        assert response.status_code == 200
        k = int(params["k"])
        alone = index.search(params["q"], k) if "q" in params else index.search_like(int(params["like"]), k)
        assert [r["row"] for r in response.json()["results"]] == [h.row for h in alone]
        assert response.json()["query"] == params.get("q")
    with pytest.raises(Busy, match="stopping"):  # leaving the client ran the app's shutdown: the worker stopped
        batcher.submit(Query(3, text="a red star"))


def test_a_full_queue_is_a_503_with_a_message_and_retry_after(index: SearchIndex, gate: Gate) -> None:
    app = create_app(index, max_queue=1)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.get, "/api/search", params={"q": "a red star", "k": "3"})
        assert gate.entered.wait(30)
        second = pool.submit(client.get, "/", params={"like": "2", "k": "3"})
        wait_until(lambda: len(app.state.batcher) == 1)
        refused = client.get("/api/search", params={"q": "a blue circle"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {"error": "The service is busy (its queue of 1 waiting searches is full). Please "
                                           "try again in a moment."}  # fmt: skip
        page = client.get("/", params={"q": "a blue circle"})
        assert page.status_code == 503 and page.headers["retry-after"] == "1"
        assert "The service is busy" in page.text and 'class="message error"' in page.text
        assert "content-security-policy" in page.headers  # a refusal is still a page of this service
        assert client.get("/healthz").status_code == 200  # the queue bounds searches only
        gate.open.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        assert client.get("/api/search", params={"q": "a blue circle"}).status_code == 200  # room again
