"""Liveness: is the event loop still turning? What `/api/livez` answers.

Readiness (`/api/healthz`) says whether this replica should get traffic; it is 503 while
draining, recovering or failing a check, all of which are normal and must never get the
process restarted. Liveness says whether the process is wedged: its event loop stalled (a
blocking call, a deadlock, a runaway computation), which only a restart fixes.

A heartbeat task sleeps `HEARTBEAT_S` at a time and measures how late it wakes up. `livez`
answers 503 when the loop is late now (the last beat is older than the threshold) or was late
beyond the threshold within the last threshold's length: a handler only runs once the loop
turns again, so the stall it reports is the one that just ended, and a loop that stalls again
and again fails probe after probe. A loop wedged for good answers nothing at all, which a
liveness probe counts as a failure too (its timeout). Drain, recovery and checks never touch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

__all__ = ["HEARTBEAT_S", "Heartbeat"]

logger = logging.getLogger("sf_lifecycle.liveness")

#: Period of the heartbeat task.
HEARTBEAT_S = 0.25


class Heartbeat:
    """Measures event-loop stalls with a task that should wake every `HEARTBEAT_S`.

    Args:
        stall_ms: A loop late by more than this is stalled (`SF_LIVENESS_STALL_MS`).
    """

    def __init__(self, stall_ms: int) -> None:
        self.stall_s = stall_ms / 1000
        self.last_beat: float | None = None
        #: (monotonic time it ended, seconds late) of the latest stall beyond the threshold.
        self.last_stall: tuple[float, float] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start beating on the running loop (once)."""
        if self._task is None:
            self.last_beat = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="sf-heartbeat")

    async def stop(self) -> None:
        """Stop the task (the process is going: nothing probes liveness any more)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            late = now - before - HEARTBEAT_S
            if late > self.stall_s:
                self.last_stall = (now, late)
                logger.warning("event loop stalled for %.0f ms", late * 1000)
            self.last_beat = now

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(alive, body) for `/api/livez`."""
        now = time.monotonic()
        if self.last_beat is None:
            return True, {"status": "alive", "heartbeat": "not started"}
        late = max(0.0, now - self.last_beat - HEARTBEAT_S)
        body: dict[str, Any] = {"loop_late_s": round(late, 3), "stall_limit_s": self.stall_s}
        stalled = late > self.stall_s
        if self.last_stall is not None and now - self.last_stall[0] <= self.stall_s:
            stalled = True
            body["last_stall_s"] = round(self.last_stall[1], 3)
        body["status"] = "stalled" if stalled else "alive"
        return not stalled, body
