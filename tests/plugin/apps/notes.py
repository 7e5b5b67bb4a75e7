"""A second small app, only for the plugin's tests: notes into the durable queue.

Unlike the example server it wires the queue to its own sink: a `SqliteSink` behind a wrapper
that, with `NOTES_SINK_DROP_EVERY=N`, silently drops every N-th record it is handed while still
reporting the batch as committed. That is the bug the plugin's oracle must catch (and name the
ids of); with the variable unset the app is correct.

    sf-lifecycle serve tests.plugin.apps.notes:app --state-dir ./state
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sf_lifecycle import FeedbackQueue, Lifecycle, Sink, SqliteSink, feedback_routes


class DroppingSink:
    """Forwards batches to `inner`, except every `every`-th record (counted across batches)."""

    def __init__(self, inner: Sink, every: int) -> None:
        self.inner = inner
        self.every = every
        self.seen = 0

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        kept = []
        for record in records:
            self.seen += 1
            if self.seen % self.every:
                kept.append(record)
        await self.inner(kept)


async def count(request: Request) -> Response:
    return JSONResponse({"app": "notes"})


def create_app() -> Starlette:
    lifecycle = Lifecycle()
    state_dir = lifecycle.settings.require_state_dir()
    queue = FeedbackQueue(state_dir, settings=lifecycle.settings)
    sink: Sink = SqliteSink(state_dir / "feedback.sqlite3")
    every = int(os.environ.get("NOTES_SINK_DROP_EVERY", "0") or 0)
    queue.install(lifecycle, DroppingSink(sink, every) if every > 0 else sink)
    app = Starlette(routes=[Route("/api/notes", count), *feedback_routes(queue, lifecycle)])
    return lifecycle.install(app)


app = create_app()
