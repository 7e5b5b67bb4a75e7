"""`serve --limit-concurrency`: what counts against the limit (issue 14)."""

from __future__ import annotations

import asyncio
from typing import Any

from sf_lifecycle._runner import _ConcurrencyLimit


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """`/events` streams (`text/event-stream`) until released; anything else answers 202."""
    if scope["path"] == "/events":
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await scope["release"].wait()
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _request(app: Any, path: str, release: asyncio.Event, sent: list[Any]) -> None:
    scope = {"type": "http", "path": path, "headers": [], "release": release}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)


async def test_open_event_streams_do_not_take_the_slots_of_requests() -> None:
    """Two idle SSE streams with a limit of 2: a POST is still answered (the library does not
    count streams as in flight either); a third plain request past the limit gets 503."""
    limit = _ConcurrencyLimit(_app, 2, frozenset())
    release = asyncio.Event()
    streams = [asyncio.create_task(_request(limit, "/events", release, [])) for _ in range(2)]
    await asyncio.sleep(0.01)
    answered: list[Any] = []
    await _request(limit, "/api/feedback", release, answered)
    assert answered[0]["status"] == 202
    assert limit.active == 0
    release.set()
    await asyncio.gather(*streams)
    assert limit.active == 0


async def test_requests_past_the_limit_get_503() -> None:
    gate = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()
        await _app(scope, receive, send)

    limit = _ConcurrencyLimit(slow, 1, frozenset())
    first: list[Any] = []
    task = asyncio.create_task(_request(limit, "/a", gate, first))
    await asyncio.sleep(0.01)
    refused: list[Any] = []
    await _request(limit, "/b", gate, refused)
    assert refused[0]["status"] == 503
    gate.set()
    await task
    assert first[0]["status"] == 202
    assert limit.active == 0
