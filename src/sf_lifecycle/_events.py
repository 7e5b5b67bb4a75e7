"""Session events: the protocol every event store implements, the ids, and the follow loop.

An `EventLog` has three operations: `append` an event to a session and get its id, `read_after`
an id, and `wait` for something newer. `follow()` builds "replay, then live" on top of those
three, and the SSE layer (`_sse.py`) streams what it yields, so another backend (PostgreSQL,
Redis Streams: XADD / XRANGE / XREAD BLOCK) plugs in beside `FileEventLog` (`_events_file.py`)
without touching the SSE layer.

Deliberate choices:

* **Ids are `"<epoch>-<seq>"`.** `seq` counts 1, 2, 3... inside one session's log; `epoch` is
  the wall-clock millisecond the log was created (for `FileEventLog`: its file). Dense
  sequence numbers make "what was lost" exact (`floor - seq` events), and the epoch makes a
  re-created log (after quarantine, or after someone deleted it) distinguishable: an id from
  another epoch gets an explicit "lost" event, never a silent replay from an unrelated
  position. Ids compare as `(epoch, seq)`.
* **A gap is an event, not an error.** A position a log can no longer serve (older than its
  retention, from another epoch, past its end) is answered with a synthetic `lost` event
  (`lost_event`) whose id is where the rest continues: the client learns what it missed and
  the stream goes on.
* **One follow loop.** `follow_batches()` is the only "replay, then live" loop (`follow()`
  yields its events one by one): the cursor advances only past events yielded and reads are
  always asked from the cursor, so a stream has no gap and no duplicate whatever the backend;
  `until` ends it (the SSE layer passes the replica's closing).
* **A backend may offer a held subscription.** An `EventLog` that is also `Subscribable`
  (`FileEventLog`: one watcher per session per process, `_sessionwatch.py`) hands each stream a
  `Subscription`: reads from what the process already holds, a wait that costs one future, no
  per-stream timer or task. The three `EventLog` operations stay the whole contract; a backend
  without `subscribe` is followed through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._errors import InvalidEventId, InvalidSessionId

__all__ = [
    "LOST",
    "Event",
    "EventLog",
    "Flag",
    "InvalidEventId",
    "InvalidSessionId",
    "Subscribable",
    "Subscription",
    "follow",
    "follow_batches",
    "lost_event",
    "parse_event_id",
    "validate_session_id",
]

_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ID_RE = re.compile(r"([0-9]{1,18})-([0-9]{1,18})")
#: Kind of the synthetic event that reports a gap.
LOST = "lost"


def validate_session_id(session: str) -> str:
    """Return `session` if it is a safe file name component, else raise `InvalidSessionId`."""
    if not isinstance(session, str) or _SESSION_RE.fullmatch(session) is None:
        raise InvalidSessionId(
            f"invalid session id {session!r}: use 1-128 characters from A-Z a-z 0-9 _ -"
        )
    return session


def parse_event_id(event_id: str) -> tuple[int, int]:
    """`"<epoch>-<seq>"` -> `(epoch, seq)`; raises `InvalidEventId`."""
    m = _ID_RE.fullmatch(event_id) if isinstance(event_id, str) else None
    if m is None:
        raise InvalidEventId(
            f"invalid event id {event_id!r}: expected <epoch>-<seq> as sent in `id:` lines"
        )
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a session.

    Attributes:
        id: `"<epoch>-<seq>"`; None only on a `lost` event for a session with no log at all.
        data_json: The event's data, serialized (sent as-is in the SSE `data:` field).
        ts_ms: Wall-clock milliseconds when it was appended.
        kind: `"message"`, or `"lost"` for the synthetic event that reports a gap.
    """

    id: str | None
    data_json: str
    ts_ms: int
    kind: str = "message"

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)


@runtime_checkable
class EventLog(Protocol):
    """What the SSE layer needs from an event store."""

    async def append(self, session: str, data: Any) -> str:
        """Append `data` (a JSON value) and return the new event's id."""
        ...

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """Retained events after `last_id` (all when None), oldest first.

        A position older than retention, from another epoch or past the end yields a leading
        `lost` event whose id is the position the rest of the list continues from.
        """
        ...

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """Wait until something after `last_id` may be readable; False on timeout."""
        ...


class Flag(Protocol):
    """When `follow()` stops: read before each event, awaited against each idle wait.

    `asyncio.Event` is one; the SSE layer adapts the replica's shutdown state.
    """

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Subscription(Protocol):
    """One stream's hold on a session (from `Subscribable.subscribe`); `close()` releases it."""

    async def read_after(self, last_id: str | None, limit: int) -> list[Event]:
        """As `EventLog.read_after`, at most `limit` events (a leading `lost` one included)."""
        ...

    async def wait(self) -> None:
        """Until something after the last read may be readable, or `wake()`."""
        ...

    def wake(self) -> None:
        """End the current (or next) `wait` now (used to stop at closing)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Subscribable(Protocol):
    """An `EventLog` that can hand a stream a `Subscription` (optional, faster fan-out)."""

    def subscribe(self, session: str) -> Subscription:
        """Hold the session for one stream. Raises `InvalidSessionId` like the log."""
        ...


#: Most events a stream takes (and sends) at a time: its buffer, whatever the backlog.
MAX_BATCH = 64


async def follow_batches(
    log: EventLog,
    session: str,
    last_id: str | None,
    *,
    idle_s: float = 5.0,
    until: Flag | None = None,
    max_batch: int = MAX_BATCH,
) -> AsyncGenerator[list[Event], None]:
    """Replay every retained event after `last_id`, then live ones, in batches of at most
    `max_batch`, until `until` is set.

    No gap and no duplicate: the cursor advances only past batches yielded, and every read is
    asked from the cursor. Close the iterator (`contextlib.aclosing`) when stopping early, so
    its waits end at once and the log's hold on the session is released.

    Args:
        log: The event store; a `Subscribable` one is followed through its subscription.
        session: The session id (validated by the log).
        last_id: The position to resume after; None for everything retained.
        idle_s: Longest single `wait` on a plain `EventLog` (asked again after it).
        until: Ends the iteration, without an error, once set; forever when None.
        max_batch: Most events per batch (a stream's buffer).

    Raises:
        InvalidEventId, InvalidSessionId: from the log, before anything is yielded.
        UnsafePath, OSError: the log cannot be read (the file backend: `sessions` is a link).
    """
    if isinstance(log, Subscribable):
        async for batch in _follow_subscribed(log.subscribe(session), last_id, until, max_batch):
            yield batch
        return
    cursor = last_id
    stop = None if until is None else asyncio.ensure_future(until.wait())
    try:
        while until is None or not until.is_set():
            batch = await log.read_after(session, cursor)
            for start in range(0, len(batch), max_batch):
                if until is not None and until.is_set():
                    return
                part = batch[start : start + max_batch]
                yield part
                cursor = part[-1].id
            if batch:
                continue
            if stop is None:
                await log.wait(session, cursor, idle_s)
                continue
            waiter = asyncio.ensure_future(log.wait(session, cursor, idle_s))
            try:
                await asyncio.wait((waiter, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
    finally:
        if stop is not None:
            stop.cancel()


async def _follow_subscribed(
    sub: Subscription, last_id: str | None, until: Flag | None, max_batch: int
) -> AsyncGenerator[list[Event], None]:
    cursor = last_id
    stop = None
    try:
        if until is not None:
            stop = asyncio.ensure_future(until.wait())
            stop.add_done_callback(lambda _: sub.wake())
        while until is None or not until.is_set():
            batch = await sub.read_after(cursor, max_batch)
            if until is not None and until.is_set():
                return  # closing began during the read: nothing more is sent
            if batch:
                yield batch
                cursor = batch[-1].id
                if len(batch) >= max_batch:
                    continue  # possibly cut short: read on at once
            # Everything was read: anything newer wakes the subscription, even while this
            # stream was sending (the wake is kept), so a wait here misses nothing.
            await sub.wait()
    finally:
        if stop is not None:
            stop.cancel()
        sub.close()


async def follow(
    log: EventLog,
    session: str,
    last_id: str | None,
    *,
    idle_s: float = 5.0,
    until: Flag | None = None,
) -> AsyncGenerator[Event, None]:
    """Replay every retained event after `last_id`, then yield live ones, until `until` is set.

    `follow_batches` one event at a time (same guarantees: no gap, no duplicate); `until` is
    read before each event. Close the iterator (`contextlib.aclosing`) when stopping early.

    Raises:
        InvalidEventId, InvalidSessionId: from the log, before anything is yielded.
        UnsafePath, OSError: the log cannot be read (the file backend: `sessions` is a link).
    """
    batches = follow_batches(log, session, last_id, idle_s=idle_s, until=until)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for event in batch:
                if until is not None and until.is_set():
                    return
                yield event


def lost_event(
    event_id: str | None, now_ms: int, reason: str, last_id: str | None, count: int | None
) -> Event:
    """The synthetic `lost` event a log answers for a position it cannot serve.

    Args:
        event_id: Where the events that follow continue from (None: the session has no log).
        now_ms: Its timestamp.
        reason: `"reset"` (another epoch, or no log), `"expired"` (older than retention) or
            `"ahead"` (past the end: the log lost its tail).
        last_id: The position the client asked for.
        count: How many events were dropped, when known.
    """
    body = {"reason": reason, "last_event_id": last_id, "resume_after": event_id, "lost": count}
    return Event(event_id, json.dumps(body, separators=(",", ":")), now_ms, LOST)
