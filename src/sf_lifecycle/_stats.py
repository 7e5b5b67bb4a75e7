"""The counters `sf_lifecycle.metrics` exposes, kept without importing prometheus_client.

Each is a plain attribute incremented where the event happens (an SSE event sent, a resume, a
`lost` event, an idempotent replay, a start-up retry), on the event loop: no lock, no
allocation, nothing on the middleware's per-request path. The metrics collector reads them at
scrape time, with the phase and counters of `ShutdownState` and each installed queue's own.
Without the `metrics` extra they cost one integer addition per event and are never read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._queue import FeedbackQueue

__all__ = ["Stats"]


class Stats:
    """Counters of one `Lifecycle` (`lifecycle.stats`), since the process started."""

    __slots__ = (
        "events_sent",
        "hooks_began",
        "hooks_ended",
        "lost_events",
        "queues",
        "startup_retries",
        "stream_resumes",
        "streams_opened",
    )

    def __init__(self) -> None:
        #: SSE events written to streams (`lost` events included, pings and `retry:` not).
        self.events_sent = 0
        #: Streams opened with a `Last-Event-ID` (a client resuming).
        self.stream_resumes = 0
        #: Streams opened.
        self.streams_opened = 0
        #: `lost` events sent (a resume position older than retention).
        self.lost_events = 0
        # Idempotent replays are counted by each queue (`FeedbackQueue.idempotent_replays`),
        # the one source of `sf_feedback_idempotent_replays_total`.
        #: Start-up tasks (orphan recovery) retried after a failure.
        self.startup_retries = 0
        #: Monotonic times the shutdown hooks began and ended (None until then).
        self.hooks_began: float | None = None
        self.hooks_ended: float | None = None
        #: Queues installed on the lifecycle (`FeedbackQueue.install`), for their gauges.
        self.queues: list[FeedbackQueue] = []
