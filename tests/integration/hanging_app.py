"""The example server whose `/api/hello` hangs for `SF_TEST_HANG_S` seconds on a share
`SF_TEST_HANG_RATE` of requests (exactly that share, evenly spread, so a test with a handful of
requests is not left to chance): a bad release that Traefik's metrics cannot see until the
requests end. The hang sits in the route, inside the lifecycle middleware, as an application's
own would."""

from __future__ import annotations

import asyncio
import os

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from examples.sf_server import app

_rate = float(os.environ.get("SF_TEST_HANG_RATE", "0"))
_hang_s = float(os.environ.get("SF_TEST_HANG_S", "0"))
_seen = 0
_route = next(r for r in app.router.routes if isinstance(r, Route) and r.path == "/api/hello")
_hello = _route.app


async def _hanging(scope: Scope, receive: Receive, send: Send) -> None:
    global _seen
    _seen += 1
    if int(_seen * _rate) > int((_seen - 1) * _rate):  # the share `_rate`, evenly spread
        await asyncio.sleep(_hang_s)
    await _hello(scope, receive, send)


_route.app = _hanging

__all__ = ["app"]
