"""The SSE baseline: sse-starlette fed from one in-memory `asyncio.Queue` per open stream.

It cannot resume a stream or reach another replica, so it is the floor the session event
streams are compared with, not a competitor. `bench_sse` serves a `QueueHub` in its own process;
`bench_scaling` runs `uvicorn --factory benchmarks._sse_baseline:queue_hub_app` as a separate
server process, the same way sf-lifecycle's example app runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["EVENTS_PATH", "HEALTH_PATH", "QueueHub", "queue_hub_app"]

#: The path `session_event_routes` serves by default; the baseline serves the same one.
EVENTS_PATH = "/api/session/events"

#: A plain 200 for `ServerProcess.wait_ready` (the events path would open a stream).
HEALTH_PATH = "/healthz"


class QueueHub:
    """One `asyncio.Queue` per open stream; a publish puts the event on every one of them."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[str]] = set()

    def publish_local(self, data: str) -> None:
        for q in self.queues:
            q.put_nowait(data)

    async def publish(self, request: Request) -> Response:
        data = (await request.body()).decode()
        self.publish_local(data)
        return JSONResponse({"ok": True}, 201)

    async def stream(self, request: Request) -> Response:
        q: asyncio.Queue[str] = asyncio.Queue()
        self.queues.add(q)

        async def gen() -> AsyncIterator[dict[str, str]]:
            try:
                while True:
                    yield {"data": await q.get()}
            finally:
                self.queues.discard(q)

        return EventSourceResponse(gen(), ping=15)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(EVENTS_PATH, self.stream, methods=["GET"]),
                Route(EVENTS_PATH, self.publish, methods=["POST"]),
            ]
        )


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


def queue_hub_app() -> Starlette:
    """The baseline as a server (`uvicorn --factory`): the hub's routes plus `HEALTH_PATH`."""
    app = QueueHub().app()
    app.router.routes.append(Route(HEALTH_PATH, _ok))
    return app
