"""An app that builds its own `Settings` with explicit arguments, as many apps do.

    sf-lifecycle serve tests.integration.pinned_app:app --port 4712

It pins `replica_id` and `port` in code; `serve`'s flags must still win over them, and `SF_*`
variables must still apply to every setting it did not pin.

- `GET /root` answers the ASGI `root_path` (`--root-path`).
- `GET /slow` holds its request until `<state_dir>/release` exists (`--limit-concurrency`).
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sf_lifecycle import Lifecycle, Settings

lifecycle = Lifecycle(Settings(replica_id="pinned", port=1))


async def root(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.scope.get("root_path", ""))


async def slow(request: Request) -> PlainTextResponse:
    release = lifecycle.settings.require_state_dir() / "release"
    for _ in range(200):
        if release.exists():
            break
        await asyncio.sleep(0.05)
    return PlainTextResponse("released")


app = lifecycle.install(Starlette(routes=[Route("/root", root), Route("/slow", slow)]))
