"""Property-based fuzzing of every endpoint of the example app.

Requests are raw ASGI calls (arbitrary header bytes, bodies, methods, query strings) against
`create_app(Settings(state_dir=tmp))` with its lifespan running, on one event loop in a thread.
For every request: no 5xx (the app is healthy, so not even the documented 503s), every 4xx our
endpoints produce is a JSON body naming the problem, an SSE stream that opens is closed cleanly by
a client disconnect. At the end every record acknowledged with 202 is in the sink exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sf_lifecycle._config import Settings

from ._harness import example_create_app, sink_rows

EXAMPLES = int(os.environ.get("SF_RELIABILITY_EXAMPLES", "150"))
MAX_BYTES = 512
PATHS = [
    "/api/feedback",
    "/api/feedback",
    "/api/session/events",
    "/api/healthz",
    "/api/ready",
    "/api/version",
    "/api/hello",
]
METHODS = [
    "GET",
    "POST",
    "POST",
    "POST",
    "HEAD",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "get",
    "BREW",
]
CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/json; charset=latin-1",
    b"application/problem+json",
    b"text/plain",
    b"multipart/form-data; boundary=x",
    b"application/x-www-form-urlencoded",
    b"",
    b'application/json;;;charset="utf8"',
]


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    app: Any
    state: Path
    acked: list[str] = field(default_factory=list)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def request(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        fut = asyncio.run_coroutine_threadsafe(
            self._call(method, path, query, headers, body), self.loop
        )
        return fut.result(15)

    async def _call(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        started: dict[str, Any] = {}
        chunks: list[bytes] = []
        sent_body = False
        disconnect = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
                if message["status"] == 200 and path == "/api/session/events":
                    disconnect.set()  # an open stream: the client goes away after its start
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await asyncio.wait_for(self.app(scope, receive, send), 10)
        return Reply(started["status"], dict(started.get("headers", [])), b"".join(chunks))


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    state = tmp_path_factory.mktemp("fuzz-state")
    cfg = Settings(
        state_dir=state, feedback_max_bytes=MAX_BYTES, drain_interval_ms=50, drain_delay_ms=0
    )
    app = example_create_app()(cfg)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lifespan = app.router.lifespan_context(app)
    asyncio.run_coroutine_threadsafe(lifespan.__aenter__(), loop).result(15)
    h = Harness(loop, app, state)
    try:
        for _ in range(200):  # start-up recovery done: keyed requests are not 503 "recovering"
            if h.request("GET", "/api/ready", b"", [], b"").status == 200:
                break
        yield h
    finally:
        asyncio.run_coroutine_threadsafe(lifespan.__aexit__(None, None, None), loop).result(30)
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _cancel_the_rest() -> None:
    """Background tasks the example app leaves running (session watchers of open streams)."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


header_value = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(
        lambda v: json.dumps(v, ensure_ascii=False).encode()
    ),
    st.integers(MAX_BYTES - 20, MAX_BYTES * 3).map(lambda n: b'{"pad":"' + b"x" * n + b'"}'),
    # JSON at its edges (issue 11, defect 10): overflow, lone surrogates, deep nesting, huge
    # integers, nested duplicates, BOM, NUL; each a 400, never a 500.
    st.sampled_from(
        [
            b'{"x": 1e400}',
            b'{"x": -1e400}',
            b'{"x": 1e-400}',
            b'{"x": "\\ud800"}',
            b'{"\\udfff": 1}',
            b'{"x": "\\u0000"}',
            b'{"a": {"b": 1, "b": 2}}',
            b"\xef\xbb\xbf{}",
            b'{"x": 9' + b"9" * 300 + b"}",
        ]
    ),
    st.integers(1, 200).map(lambda n: b"[" * n + b"]" * n),
    st.integers(60, 300).map(lambda n: b'{"x":' + b"[" * n + b"1" + b"]" * n + b"}"),
)
sessions = st.one_of(
    st.sampled_from(["s1", "s-2_x", "", "../etc/passwd", "a/b", "..", "x" * 129, "%00"]),
    st.text(max_size=20),
)
event_ids = st.one_of(
    st.none(),
    st.sampled_from(["0-0", "1-1", "99999999999999999999-1", "-1", "1-", "abc", " 1-2 "]),
    st.text(max_size=24),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same campaign every run; `make reliability` raises the count
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(PATHS),
    ctype=st.one_of(st.sampled_from(CONTENT_TYPES), header_value, st.none()),
    key=st.one_of(st.none(), st.sampled_from([b"k1", b"k2", b"bad key", b"x" * 129]), header_value),
    session=sessions,
    last_id=event_ids,
    extra=st.lists(
        st.tuples(st.sampled_from([b"x-a", b"accept", b"content-length"]), header_value), max_size=3
    ),
    body=bodies,
    valid=st.sampled_from([None, None, "feedback", "publish", "stream"]),
    obj=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
# The statuses the last test expects to have seen, pinned: how many examples Hypothesis runs
# before it stops can vary from run to run, the coverage of the main refusals must not.
@example(
    method="POST",
    path="/api/feedback",
    ctype=b"application/json",
    key=None,
    session="s1",
    last_id=None,
    extra=[],
    body=b'{"pad":"' + b"x" * (MAX_BYTES * 2) + b'"}',
    valid=None,
    obj={},
)
@example(
    method="POST",
    path="/api/feedback",
    ctype=b"text/plain",
    key=None,
    session="s1",
    last_id=None,
    extra=[],
    body=b"{}",
    valid=None,
    obj={},
)
def test_no_5xx_and_clear_4xx_for_any_request(
    harness: Harness,
    valid: str | None,
    obj: dict[str, Any],
    method: str,
    path: str,
    ctype: bytes | None,
    key: bytes | None,
    session: str,
    last_id: str | None,
    extra: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    if valid is not None:  # a well-formed request, so the accepting paths are fuzzed too
        method, ctype, extra = ("GET" if valid == "stream" else "POST"), b"application/json", []
        path = "/api/feedback" if valid == "feedback" else "/api/session/events"
        body = json.dumps(obj).encode()
        session = "s1"
        if key is not None and valid == "feedback":
            key = b"k-" + str(len(body) % 7).encode()  # repeated keys: replays and 422s
    headers: list[tuple[bytes, bytes]] = list(extra)
    if ctype is not None:
        headers.append((b"content-type", ctype))
    if key is not None:
        headers.append((b"idempotency-key", key))
    if last_id is not None:
        headers.append((b"last-event-id", last_id.encode("utf-8", "surrogateescape")[:64]))
    query = f"session={quote(session, safe='')}".encode()
    reply = harness.request(method, path, query, headers, body)
    harness.statuses[(path, reply.status)] += 1
    assert reply.status < 500, (reply.status, reply.body)
    ours = path != "/api/hello"  # the app's own route answers as the app decides
    if 400 <= reply.status < 500 and ours and method != "HEAD":
        # Every refusal of the library is an RFC 9457 problem naming what was wrong.
        assert reply.headers.get(b"content-type") == b"application/problem+json", reply.headers
        problem = json.loads(reply.body)
        assert problem["status"] == reply.status, problem
        assert problem["type"].endswith(":" + problem["code"]), problem
        assert problem["title"], problem
        assert problem["detail"], problem
    if path == "/api/feedback" and reply.status == 202:
        rid = json.loads(reply.body)["id"]
        if reply.headers.get(b"idempotent-replayed") != b"true":
            harness.acked.append(rid)
        else:
            assert rid in harness.acked


def test_zz_everything_acknowledged_during_the_fuzzing_is_in_the_sink_once(
    harness: Harness,
) -> None:
    """Runs after the fuzz test (same module fixture): a final drain, then the sink is checked."""
    queue_drain = asyncio.run_coroutine_threadsafe(_drain_all(harness), harness.loop)
    queue_drain.result(30)
    ids = [rid for rid, _ in sink_rows(harness.state)]
    assert len(ids) == len(set(ids))
    assert set(harness.acked) <= set(ids)
    seen = {status for _, status in harness.statuses}
    # The fuzzer reached the accepting paths and the main refusals, not only 404s.
    assert {200, 201, 202, 400, 405, 413, 415} <= seen, harness.statuses


async def _drain_all(h: Harness) -> None:
    for _ in range(200):
        if set(h.acked) <= {rid for rid, _ in sink_rows(h.state)}:
            return
        await asyncio.sleep(0.05)
