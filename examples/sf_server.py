"""Example 1: the example server, a small port of the original sf-server.

Run it the way production does:

    sf-lifecycle serve examples.sf_server:app --port 4000 --state-dir ./state

It mounts the health routes and adds `GET /api/slow?seconds=S` so a request can be held in flight
across a SIGTERM (the demo and the integration tests use it).
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sf_lifecycle import Lifecycle, Settings

#: Longest `/api/slow` hold, so a typo cannot pin a worker for an hour.
MAX_SLOW_S = 30.0


async def slow(request: Request) -> Response:
    raw = request.query_params.get("seconds", "1")
    try:
        seconds = float(raw)
    except ValueError:
        return JSONResponse({"error": f"seconds must be a number, got {raw!r}"}, 400)
    if not 0 <= seconds <= MAX_SLOW_S:
        return JSONResponse({"error": f"seconds must be between 0 and {MAX_SLOW_S:g}"}, 400)
    await asyncio.sleep(seconds)
    return JSONResponse({"slept_s": seconds})


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "sf"})


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the example app with its own lifecycle (settings from `SF_*` when None)."""
    lifecycle = Lifecycle(settings)
    app = Starlette(routes=[Route("/api/slow", slow), Route("/api/hello", hello)])
    return lifecycle.install(app)


app = create_app()
