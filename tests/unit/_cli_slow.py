"""An app with a slow route (test_cli): `/slow` holds its request for a second."""

import asyncio

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sf_lifecycle import Lifecycle, Settings


async def slow(request: object) -> PlainTextResponse:
    await asyncio.sleep(1.5)
    return PlainTextResponse("slow")


lifecycle = Lifecycle(Settings(drain_delay_ms=0))
app = lifecycle.install(Starlette(routes=[Route("/slow", slow)]))
