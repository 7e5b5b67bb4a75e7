from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sf_lifecycle import Lifecycle, LifecycleMiddleware, Settings
from sf_lifecycle._state import ShutdownState

SEEN_WHILE_STREAMING: list[int] = []


def build(
    replica: str | None = None,
) -> tuple[Lifecycle, Starlette, dict[str, asyncio.Event]]:
    lc = Lifecycle(Settings(replica_id=replica))
    gates = {"hold": asyncio.Event(), "entered": asyncio.Event()}
    SEEN_WHILE_STREAMING.clear()

    async def hold(request: Request) -> Response:
        gates["entered"].set()
        await gates["hold"].wait()
        return PlainTextResponse("held", headers={"connection": "keep-alive"})

    async def boom(request: Request) -> Response:
        raise RuntimeError("handler failed")

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            for i in range(3):
                SEEN_WHILE_STREAMING.append(lc.state.in_flight)
                yield f"chunk{i}\n"
                await asyncio.sleep(0)

        return StreamingResponse(body())

    app = Starlette(
        routes=[
            Route("/hold", hold),
            Route("/boom", boom),
            Route("/stream", stream),
            Route("/api/session/events", hold),
        ]
    )
    return lc, lc.install(app), gates


async def test_counts_in_flight_and_releases_after_response() -> None:
    lc, app, gates = build()
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        task = asyncio.create_task(c.get("/hold"))
        await gates["entered"].wait()
        assert lc.state.in_flight == 1
        health = await c.get("/api/healthz")
        assert health.json()["in_flight"] == 1  # the probe itself is not counted
        gates["hold"].set()
        assert (await task).text == "held"
    assert lc.state.in_flight == 0


async def test_healthz_reports_how_long_requests_have_been_in_flight() -> None:
    """A request that hangs is visible in /api/healthz with a lower bound of its age (what a
    rollout needs: Traefik's metrics only see requests that ended); one that ended is not."""
    lc, app, gates = build()
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        task = asyncio.create_task(c.get("/hold"))
        await gates["entered"].wait()
        first = (await c.get("/api/healthz")).json()
        assert first["in_flight_ages_s"] == [[0.0, 1]]  # began just before this probe
        await asyncio.sleep(0.3)
        ages = (await c.get("/api/healthz")).json()["in_flight_ages_s"]
        assert len(ages) == 1
        assert ages[0][1] == 1
        assert 0.3 <= ages[0][0] < 1.0
        gates["hold"].set()
        await task
        assert (await c.get("/api/healthz")).json()["in_flight_ages_s"] == []
    assert sum(lc.state.open_by_generation.values()) == 0
    assert len(lc.state.open_by_generation) <= 2  # finished generations are dropped


async def test_stream_paths_are_not_counted() -> None:
    lc, app, gates = build()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        task = asyncio.create_task(c.get("/api/session/events"))
        await gates["entered"].wait()
        assert lc.state.in_flight == 0
        gates["hold"].set()
        await task


async def test_counter_released_when_the_app_raises() -> None:
    lc, app, _ = build()
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/boom")
    assert r.status_code == 500
    assert lc.state.in_flight == 0


async def test_streaming_response_counted_until_the_last_chunk() -> None:
    lc, app, _ = build()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/stream")
    assert r.status_code == 200
    assert r.text == "chunk0\nchunk1\nchunk2\n"
    assert SEEN_WHILE_STREAMING == [1, 1, 1]
    assert lc.state.in_flight == 0


async def test_connection_close_only_while_draining_and_never_rejects() -> None:
    lc, app, gates = build()
    gates["hold"].set()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/hold")
        assert r.headers["connection"] == "keep-alive"
        lc.state.begin_draining()
        r = await c.get("/hold")
        assert r.status_code == 200
        assert r.headers.get_list("connection") == ["close"]


async def test_request_started_before_drain_gets_connection_close() -> None:
    lc, app, gates = build()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        task = asyncio.create_task(c.get("/hold"))
        await gates["entered"].wait()
        lc.state.begin_draining()
        gates["hold"].set()
        r = await task
    assert r.status_code == 200
    assert r.headers["connection"] == "close"


@pytest.mark.parametrize("path", ["/hold", "/api/healthz", "/nowhere"])
async def test_replica_header_on_every_response(path: str) -> None:
    lc, app, gates = build(replica="blue-7")
    gates["hold"].set()
    await lc.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get(path)
    assert r.headers["x-sf-replica"] == "blue-7"


async def test_no_replica_header_without_replica_id() -> None:
    _lc, app, gates = build()
    gates["hold"].set()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/hold")
    assert "x-sf-replica" not in r.headers


async def test_non_http_scopes_pass_through_untouched() -> None:
    lc = Lifecycle(Settings())
    seen: list[str] = []

    async def inner(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(str(scope["type"]))

    mw = LifecycleMiddleware(inner, lc)  # type: ignore[arg-type]
    await mw({"type": "websocket", "path": "/ws"}, None, None)  # type: ignore[arg-type]
    await mw({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["websocket", "lifespan"]
    assert lc.state.in_flight == 0


def test_state_is_shared_not_global() -> None:
    a, b = Lifecycle(Settings()), Lifecycle(Settings(), state=ShutdownState())
    a.state.begin_draining()
    assert b.state.phase.name == "STARTING"
