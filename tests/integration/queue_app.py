"""An app for the queue's process tests: `POST /api/feedback` into its own sink, with switches.

    sf-lifecycle serve tests.integration.queue_app:app --state-dir ./state

- `QUEUE_APP_SINK_DB=NAME`: the sink is `<state_dir>/NAME` (default `app.sqlite3`, not the
  library's `feedback.sqlite3`, so a test sees which sink a record went to).
- `QUEUE_APP_SINK_FAILURES=N`: the first N sink calls of the process raise (a database that is
  not reachable yet when the replica starts).
- `QUEUE_APP_START_SEQ=N`: the queue numbers its next segment N+1 (a process that has been
  running for a long time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette

from sf_lifecycle import FeedbackQueue, Lifecycle, Sink, SqliteSink, feedback_routes


class FailingFirst:
    """Forwards to `inner` except for its first `failures` calls, which raise."""

    def __init__(self, inner: Sink, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.calls = 0

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"sink unavailable (call {self.calls} of {self.failures})")
        await self.inner(records)


def create_app() -> Starlette:
    lifecycle = Lifecycle()
    state_dir = lifecycle.settings.require_state_dir()
    queue = FeedbackQueue(state_dir, settings=lifecycle.settings)
    queue._start_segments_after(int(os.environ.get("QUEUE_APP_START_SEQ", "0") or 0))
    sink: Sink = SqliteSink(state_dir / os.environ.get("QUEUE_APP_SINK_DB", "app.sqlite3"))
    failures = int(os.environ.get("QUEUE_APP_SINK_FAILURES", "0") or 0)
    queue.install(lifecycle, FailingFirst(sink, failures) if failures else sink)
    return lifecycle.install(Starlette(routes=feedback_routes(queue, lifecycle)))


app = create_app()
