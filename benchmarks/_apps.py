"""The apps the middleware benchmarks serve: one tiny Starlette app, with and without sf-lifecycle.

Both are factories (`uvicorn --factory benchmarks._apps:bare_app`) so that importing this module
builds nothing. The two differ only by `Lifecycle.install()` (health routes plus the in-flight
middleware), which is exactly the cost being measured.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from sf_lifecycle import Lifecycle, Settings

__all__ = ["bare_app", "lifecycle_app", "raw_app"]


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "sf"})


def bare_app() -> Starlette:
    """The baseline: one JSON route, nothing else."""
    return Starlette(routes=[Route("/", hello)])


def lifecycle_app() -> Starlette:
    """The same app with sf-lifecycle installed (health routes and middleware)."""
    lifecycle = Lifecycle(Settings.from_env())
    return lifecycle.install(bare_app())


_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
_BODY: Message = {"type": "http.response.body", "body": b"ok", "more_body": False}


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The cheapest possible ASGI app: so the in-process benchmark isolates the middleware."""
    await send(_START)
    await send(_BODY)
