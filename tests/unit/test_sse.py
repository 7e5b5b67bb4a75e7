"""SSE routes against a real uvicorn on a free port, in this process (streaming end to end)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from httpx_sse import ServerSentEvent, aconnect_sse
from starlette.applications import Starlette

from sf_lifecycle import Lifecycle, Settings
from sf_lifecycle._events import parse_event_id
from sf_lifecycle._events_file import FileEventLog
from sf_lifecycle._sse import EVENTS_PATH, session_event_routes
from sf_lifecycle.testing.process import free_port

URL = EVENTS_PATH


class Server:
    def __init__(self, lifecycle: Lifecycle, log: FileEventLog, base: str) -> None:
        self.lifecycle = lifecycle
        self.log = log
        self.base = base

    async def healthz(self, client: httpx.AsyncClient) -> dict[str, Any]:
        body: dict[str, Any] = (await client.get("/api/healthz")).json()
        return body


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[Server]:
    """uvicorn serving an app with the event routes, stopped (and awaited) on exit."""
    s = Settings(state_dir=tmp_path, **{"sse_ping_ms": 60_000, **settings})
    lifecycle = Lifecycle(s)
    log = FileEventLog.from_settings(s)
    app = lifecycle.install(Starlette(routes=session_event_routes(lifecycle, log)))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield Server(lifecycle, log, f"http://127.0.0.1:{port}")
    finally:
        lifecycle.state.begin_closing()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await log.aclose()


def client(srv: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.base, timeout=10)


async def publish(c: httpx.AsyncClient, session: str, data: Any) -> str:
    r = await c.post(URL, params={"session": session}, json=data)
    assert r.status_code == 201, r.text
    event_id: str = r.json()["id"]
    return event_id


async def collect(
    events: AsyncIterator[ServerSentEvent], n: int, within_s: float = 5
) -> list[ServerSentEvent]:
    """The next `n` real events (ping echoes with empty data are skipped)."""
    out: list[ServerSentEvent] = []

    async def run() -> None:
        async for sse in events:
            if sse.data or sse.retry is not None:
                out.append(sse)
                if len(out) == n:
                    return

    await asyncio.wait_for(run(), within_s)
    return out


async def test_publish_then_stream_replays_and_goes_live(tmp_path: Path) -> None:
    async with running(tmp_path) as srv, client(srv) as c:
        first = [await publish(c, "s1", {"n": i}) for i in range(3)]
        async with aconnect_sse(c, "GET", URL, params={"session": "s1"}) as source:
            assert source.response.status_code == 200
            assert source.response.headers["cache-control"] == "no-store"
            events = source.aiter_sse()
            got = await collect(events, 3)
            assert [e.id for e in got] == first
            assert [json.loads(e.data) for e in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
            # Counted as a stream, not as in flight.
            health = await srv.healthz(c)
            assert (health["streams"], health["in_flight"]) == (1, 0)
            live = await publish(c, "s1", ["live"])
            (event,) = await collect(events, 1)
            assert (event.id, json.loads(event.data)) == (live, ["live"])
        await asyncio.sleep(0.2)
        assert (await srv.healthz(c))["streams"] == 0


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_from_last_event_id(tmp_path: Path, how: str) -> None:
    async with running(tmp_path) as srv, client(srv) as c:
        ids = [await publish(c, "s", i) for i in range(5)]
        kw: dict[str, Any] = (
            {"headers": {"Last-Event-ID": ids[1]}}
            if how == "header"
            else {"params": {"session": "s", "last_event_id": ids[1]}}
        )
        kw.setdefault("params", {"session": "s"})
        async with aconnect_sse(c, "GET", URL, **kw) as source:
            got = await collect(source.aiter_sse(), 3)
        assert [e.id for e in got] == ids[2:]


async def test_expired_resume_gets_a_lost_event(tmp_path: Path) -> None:
    async with running(tmp_path, sse_retention_events=2) as srv, client(srv) as c:
        ids = [await publish(c, "s", i) for i in range(6)]
        headers = {"Last-Event-ID": ids[0]}
        async with aconnect_sse(c, "GET", URL, params={"session": "s"}, headers=headers) as src:
            got = await collect(src.aiter_sse(), 3)
        assert got[0].event == "lost"
        assert json.loads(got[0].data)["lost"] == 3
        assert parse_event_id(got[0].id) == parse_event_id(ids[3])
        assert [e.id for e in got[1:]] == ids[4:]


async def test_stream_flows_while_draining_then_closing_sends_retry_and_ends(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, sse_retry_ms=1234) as srv, client(srv) as c:
        state = srv.lifecycle.state
        async with aconnect_sse(c, "GET", URL, params={"session": "s"}) as source:
            events = source.aiter_sse()
            state.begin_draining()
            during = await publish(c, "s", "during drain")
            (got,) = await collect(events, 1)
            assert got.id == during
            state.begin_closing()
            loop = asyncio.get_running_loop()
            began = loop.time()
            (final,) = await collect(events, 1, within_s=2)
            assert final.retry == 1234
            assert final.data == ""
            rest = [e async for e in events]  # the response ends: no more events, no hang
            assert loop.time() - began < 1.0
            assert all(not e.data for e in rest)
        # Closing: no new streams here; the client is told when to retry.
        r = await c.get(URL, params={"session": "s"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"
        assert state.streams == 0


async def test_max_streams_answers_503_with_retry_after(tmp_path: Path) -> None:
    async with running(tmp_path, sse_max_streams=2) as srv, client(srv) as c:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                src = await stack.enter_async_context(
                    aconnect_sse(c, "GET", URL, params={"session": "s"})
                )
                assert src.response.status_code == 200
            r = await c.get(URL, params={"session": "s"})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "limit 2" in r.json()["detail"]
        await asyncio.sleep(0.2)
        async with aconnect_sse(c, "GET", URL, params={"session": "s"}) as src:
            assert src.response.status_code == 200


async def test_pings_keep_an_idle_stream_alive(tmp_path: Path) -> None:
    async with running(tmp_path, sse_ping_ms=150) as srv, client(srv) as c:
        async with c.stream("GET", URL, params={"session": "idle"}) as r:
            lines: list[str] = []

            async def read() -> None:
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith(": ping"):
                        return

            await asyncio.wait_for(read(), 2)
        assert any(line.startswith(": ping") for line in lines)


async def chunked(body: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "words"),
    [
        ("text/plain", b'{"a":1}', 415, "content-type"),
        (None, b'{"a":1}', 415, "content-type"),
        ("application/json; charset=latin-1", b'{"a":1}', 415, "UTF-8"),
        ("application/json", b'{"a":', 400, "not valid JSON"),
        ("application/json", b"", 400, "not valid JSON"),
        ("application/json", b'{"a": NaN}', 400, "NaN"),
        ("application/json", b"[Infinity]", 400, "Infinity"),
        ("application/json", b'{"a":1,"a":2}', 400, "duplicate key"),
        ("application/json", b'{"a":"\xff"}', 400, "UTF-8"),
        ("application/json", b'{"a":"' + b"x" * 300 + b'"}', 413, "limit of 256"),
    ],
)
async def test_bad_publish_input_gets_a_clear_4xx(
    tmp_path: Path, content_type: str | None, body: bytes, status: int, words: str
) -> None:
    async with running(tmp_path, feedback_max_bytes=256) as srv, client(srv) as c:
        headers = {"content-type": content_type} if content_type else {}
        r = await c.post(URL, params={"session": "s"}, content=body, headers=headers)
        assert r.status_code == status, r.text
        assert words in r.json()["detail"]
        assert await srv.log.read_after("s", None) == []


async def test_size_limit_is_enforced_while_reading_a_chunked_body(tmp_path: Path) -> None:
    async with running(tmp_path, feedback_max_bytes=256) as srv, client(srv) as c:
        body = b'{"a":"' + b"x" * 5000 + b'"}'
        r = await c.post(
            URL,
            params={"session": "s"},
            content=chunked(body),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert "content-length" not in r.request.headers
        ok = await c.post(
            URL,
            params={"session": "s"},
            content=chunked(b'{"small":true}', 3),
            headers={"content-type": "application/vnd.x+json; charset=utf-8"},
        )
        assert ok.status_code == 201


@pytest.mark.parametrize(
    ("method", "params", "headers", "words"),
    [
        ("GET", {}, {}, "invalid session id"),
        ("GET", {"session": "../x"}, {}, "invalid session id"),
        ("POST", {"session": "a/b"}, {"content-type": "application/json"}, "invalid session"),
        ("GET", {"session": "s"}, {"Last-Event-ID": "seven"}, "invalid event id"),
        ("GET", {"session": "s", "last_event_id": "1-"}, {}, "invalid event id"),
    ],
)
async def test_bad_session_or_position_is_400(
    tmp_path: Path, method: str, params: dict[str, str], headers: dict[str, str], words: str
) -> None:
    async with running(tmp_path) as srv, client(srv) as c:
        r = await c.request(method, URL, params=params, headers=headers, content=b"{}")
        assert r.status_code == 400
        assert words in r.json()["detail"]


async def test_disk_error_on_publish_is_503(tmp_path: Path) -> None:
    async with running(tmp_path) as srv, client(srv) as c:
        await publish(c, "s", 1)
        log = tmp_path / "sessions" / "s.log"
        # Immutable: the write is refused (EPERM) even for root. (A folder in its place is
        # moved aside, not an error.)
        await asyncio.to_thread(subprocess.run, ["chattr", "+i", str(log)], check=True)
        try:
            r = await c.post(URL, params={"session": "s"}, json=2)
        finally:
            await asyncio.to_thread(subprocess.run, ["chattr", "-i", str(log)], check=True)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "disk" in r.json()["detail"]


async def test_a_folder_named_like_the_log_never_cuts_a_stream(tmp_path: Path) -> None:
    """`sessions/<s>.log` is a folder: it is moved aside, the GET streams (no 500, no cut
    stream), and publishing works."""
    (tmp_path / "sessions" / "s1.log").mkdir(parents=True)
    async with (
        running(tmp_path) as srv,
        client(srv) as c,
        aconnect_sse(
            c, "GET", URL, params={"session": "s1"}, headers={"Last-Event-ID": "1-1"}
        ) as source,
    ):
        assert source.response.status_code == 200
        events = source.aiter_sse()
        (lost,) = await collect(events, 1)
        assert json.loads(lost.data)["reason"] == "reset"
        live = await publish(c, "s1", {"x": 1})
        (event,) = await collect(events, 1)
        assert event.id == live
    assert [p for p in (tmp_path / "sessions").iterdir() if p.name.startswith("s1.corrupt-")]


def test_the_overridden_sse_starlette_watcher_still_exists() -> None:
    """`_sse.py` replaces sse-starlette's exit watcher (its public shutdown API is a
    process-global flag polled every 0.5 s; ARCHITECTURE.md, "Dependencies"): if a release
    renames it, the override would silently do nothing and streams would be cut at SIGTERM."""
    from sse_starlette import EventSourceResponse

    from sf_lifecycle._sse import _LifecycleEventSourceResponse

    # The per-send timeout too (`_send_with_timeout`, replaced for speed; see `_sse.py`).
    for name in ("_listen_for_exit_signal_with_grace", "_send_with_timeout"):
        assert callable(getattr(EventSourceResponse, name, None))
        assert name in vars(_LifecycleEventSourceResponse)


async def test_a_stream_whose_client_stops_reading_ends_after_the_send_timeout(
    tmp_path: Path,
) -> None:
    """Steps: a stream opened straight on the ASGI app with `send_timeout_s=0.2`, whose
    transport accepts the response head and then never accepts another byte (a client that
    stopped reading); an event is published: the response ends with `SendTimeoutError` within
    about the timeout, and the stream is no longer counted."""
    from sse_starlette.sse import SendTimeoutError

    lifecycle = Lifecycle(Settings(state_dir=tmp_path))
    log = FileEventLog(tmp_path)
    app = Starlette(routes=session_event_routes(lifecycle, log, send_timeout_s=0.2))
    started = asyncio.Event()
    stalled = asyncio.Event()  # never set

    async def receive() -> dict[str, Any]:
        await stalled.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            started.set()
            return
        await stalled.wait()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": EVENTS_PATH,
        "raw_path": EVENTS_PATH.encode(),
        "root_path": "",
        "query_string": b"session=s",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    call = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    await asyncio.wait_for(started.wait(), 5)
    assert lifecycle.state.streams == 1
    await log.append("s", {"big": "x" * 100})
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(SendTimeoutError):
        await asyncio.wait_for(call, 5)
    assert loop.time() - began < 3
    assert lifecycle.state.streams == 0
    await log.aclose()


def asgi_get(query: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": EVENTS_PATH,
        "raw_path": EVENTS_PATH.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def test_a_slow_but_steady_client_behind_by_many_big_events_is_not_cut(
    tmp_path: Path,
) -> None:
    """Steps: 20 events of 30 KB wait in a session; a stream opened straight on the ASGI app
    with `send_timeout_s=0.5` has a transport that accepts 500 KB/s, steadily; then a live
    event is published: the client gets all 21, in order, and is never cut. Every write is at
    most 64 KiB (or one event): before, the 20 went in one 600 KB write, 1.2 s at that rate,
    and the send timeout ended the stream with the live event lost."""
    rate = 500_000
    lifecycle = Lifecycle(Settings(state_dir=tmp_path, sse_ping_ms=60_000))
    log = FileEventLog(tmp_path)
    ids = [await log.append("s", {"i": i, "pad": "x" * 30_000}) for i in range(20)]
    app = Starlette(routes=session_event_routes(lifecycle, log, send_timeout_s=0.5))
    body = bytearray()
    writes: list[int] = []
    got_all = asyncio.Event()
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        chunk = message.get("body", b"")
        await asyncio.sleep(len(chunk) / rate)  # a client reading at `rate`, steadily
        body.extend(chunk)
        writes.append(len(chunk))
        if body.count(b"\nid: ") + body.startswith(b"id: ") == len(ids):
            got_all.set()

    call = asyncio.create_task(app(asgi_get(b"session=s"), receive, send))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(asyncio.shield(got_all.wait()), 20)
        ids.append(await log.append("s", {"live": 1}))
        got_all.clear()
        await asyncio.wait_for(asyncio.shield(got_all.wait()), 10)
        lifecycle.state.begin_closing()
        await asyncio.wait_for(call, 10)  # no SendTimeoutError
    finally:
        done.set()
        call.cancel()
        await log.aclose()
    sent = [line[4:].decode() for line in bytes(body).split(b"\r\n") if line.startswith(b"id: ")]
    assert sent == ids
    assert max(writes) <= 64 * 1024
    assert lifecycle.state.streams == 0


def test_encoded_frames_kept_are_bounded_by_bytes_not_by_count() -> None:
    """Steps: 300 distinct 100 KB events go through the frame cache once each (a stream of a
    session whose retention keeps 10), then are dropped: what stays allocated is at most the
    cache's 8 MiB, not 300 frames plus the events' data (60 MB before). A recent event is
    still answered with the very same bytes; an id reused by a re-created log is not."""
    import tracemalloc

    from sf_lifecycle._events import Event
    from sf_lifecycle._sse import FRAMES_CACHE_BYTES, _Frames

    frames = _Frames()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(300):
            event = Event(f"1-{i}", json.dumps({"i": i, "pad": "x" * 100_000}), 1000 + i)
            assert frames.get("s", event).startswith(f"id: 1-{i}\r\n".encode())
            del event
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held <= FRAMES_CACHE_BYTES + 1024 * 1024, held
    recent = Event("1-299", json.dumps({"i": 299, "pad": "x" * 100_000}), 1299)
    assert frames.get("s", recent) is frames.get("s", recent)
    reused = Event("1-299", json.dumps({"other": True}), 5000)
    assert b'data: {"other": true}' in frames.get("s", reused)
