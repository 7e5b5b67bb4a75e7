"""An app whose readiness an integration test opens by creating files in its state directory.

    sf-lifecycle serve tests.integration.gated_app:app --state-dir ./state

- readiness check `gate`: fails (`NotReady`) until `<state_dir>/check-ok` exists, when
  `GATED_APP_CHECK=1` (a database that does not answer yet).
- the sink blocks until `<state_dir>/sink-open` exists, so start-up recovery of an orphaned
  segment left in `<state_dir>/feedback` (a replica SIGKILLed mid-drain) stays unfinished.
- `GET /who` answers the replica id (`SF_REPLICA_ID`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sf_lifecycle import FeedbackQueue, Lifecycle, NotReady, Sink, SqliteSink, feedback_routes


class FileGatedSink:
    """Forwards to `inner` once `gate` exists; until then each call waits for it."""

    def __init__(self, inner: Sink, gate: Path) -> None:
        self.inner = inner
        self.gate = gate

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        while not self.gate.exists():  # noqa: ASYNC110 - another process creates the file
            await asyncio.sleep(0.05)
        await self.inner(records)


def create_app() -> Starlette:
    lifecycle = Lifecycle()
    state_dir = lifecycle.settings.require_state_dir()
    queue = FeedbackQueue(state_dir, settings=lifecycle.settings)
    sink = FileGatedSink(SqliteSink(state_dir / "app.sqlite3"), state_dir / "sink-open")
    queue.install(lifecycle, sink)

    async def gate() -> None:
        if os.environ.get("GATED_APP_CHECK") == "1" and not (state_dir / "check-ok").exists():
            raise NotReady("check-ok missing")

    lifecycle.add_readiness_check("gate", gate, cache_s=0)

    async def who(request: Request) -> PlainTextResponse:
        return PlainTextResponse(lifecycle.settings.replica_id or "?")

    routes = [Route("/who", who), *feedback_routes(queue, lifecycle)]
    return lifecycle.install(Starlette(routes=routes))


app = create_app()
