"""Wiring a `FeedbackQueue` into a `Lifecycle`: start-up recovery, readiness, the final drain.

`FeedbackQueue.install(lifecycle, sink)` calls `install` here. It registers four things, each
under a name the ready body and the logs show:

- `feedback-recovery` (start-up): start the drainer, recover dead peers' files, raise while that
  is incomplete (the lifecycle retries with backoff; keyed writes answer 503 meanwhile), then
  sweep for orphans every `orphan_sweep_ms`;
- `feedback-queue` (readiness): recovery, sweep and drainer state and the queue's counters;
- `idempotency-index` (readiness): not ready while the index cannot be used (keyed writes
  answer 503 then);
- `feedback-drain` (shutdown): `close(deadline)`, the final drain within the grace budget.

Before any of it, it wires the idempotency index beside the queue (`queue.idempotency`), so
keyed records that recovery re-delivers have their keys recorded. It also remembers the queue
(weakly), so `sf-lifecycle queue recover --app` finds the queue an
application installed and delivers through its sink and listeners.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from ._queue import FeedbackQueue
    from ._sink import Sink

__all__ = ["install", "installed_queues"]

#: Queues registered with a lifecycle, for `sf-lifecycle queue recover --app`.
_installed: weakref.WeakSet[FeedbackQueue] = weakref.WeakSet()


def install(queue: FeedbackQueue, lifecycle: Lifecycle, sink: Sink | None = None) -> None:
    """Register `queue` with `lifecycle` (see `FeedbackQueue.install`).

    Args:
        queue: The queue to run under the lifecycle.
        lifecycle: The application's lifecycle.
        sink: Where records go; a `SqliteSink` at `<state_dir>/feedback.sqlite3` (closed with
            the queue) when None.
    """
    from ._sink import SqliteSink
    from .idempotency import IdempotencyIndex

    index = queue.idempotency
    if index is None:
        # Before recovery: re-delivered keyed orphans record their keys in it.
        index = queue.idempotency = IdempotencyIndex.for_queue(queue)
    if sink is None:
        own = SqliteSink(
            queue.state_dir / "feedback.sqlite3",
            file_mode=queue.file_mode,
            dir_mode=queue.dir_mode,
        )
        queue.on_close(own.close)
        sink = own
    queue.sink = sink
    recover_at_startup = queue.startup_hook(sink)
    _installed.add(queue)
    lifecycle.stats.queues.append(queue)

    async def readiness() -> dict[str, Any]:
        return {
            "recovery": dict(queue.recovery),
            "sweep": dict(queue.sweep),
            "drainer": dict(queue.drainer),
            **asdict(queue.stats()),
        }

    async def final_drain(deadline: float) -> None:
        await queue.close(deadline)

    lifecycle.on_startup("feedback-recovery", recover_at_startup)
    # Cheap enough for every probe (in-memory counters; the index touches its local file only
    # while it is unusable): no cache, so recovering from a failure shows at the next probe.
    lifecycle.add_readiness_check("feedback-queue", readiness, cache_s=0)
    lifecycle.add_readiness_check("idempotency-index", index.check, cache_s=0)
    lifecycle.on_shutdown("feedback-drain", final_drain)


def installed_queues(state_dir: str | os.PathLike[str] | None = None) -> list[FeedbackQueue]:
    """The queues `install`ed in this process (on `state_dir` when given), oldest first."""
    found = sorted(_installed, key=lambda q: q.token)
    if state_dir is None:
        return found
    want = Path(state_dir).resolve()
    return [q for q in found if q.state_dir.resolve() == want]
