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
* **One follow loop.** `follow()` is the only "replay, then live" loop: the cursor advances
  only past events yielded and `read_after` is always asked from the cursor, so a stream has
  no gap and no duplicate whatever the backend; `until` ends it (the SSE layer passes the
  replica's closing).
"""

from __future__ import annotations

import asyncio
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
    "follow",
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


async def follow(
    log: EventLog,
    session: str,
    last_id: str | None,
    *,
    idle_s: float = 5.0,
    until: Flag | None = None,
) -> AsyncGenerator[Event, None]:
    """Replay every retained event after `last_id`, then yield live ones, until `until` is set.

    No gap and no duplicate: the cursor advances only past events yielded, and `read_after` is
    always asked from the cursor. Close the iterator (`contextlib.aclosing`) when stopping
    early, so its waits end at once.

    Args:
        log: The event store.
        session: The session id (validated by the log).
        last_id: The position to resume after; None for everything retained.
        idle_s: Longest single `wait` (the log is asked again after it, whatever it says).
        until: Ends the iteration, without an error, once set; forever when None.

    Raises:
        InvalidEventId, InvalidSessionId: from the log, before anything is yielded.
        UnsafePath, OSError: the log cannot be read (the file backend: `sessions` is a link).
    """
    cursor = last_id
    stop = None if until is None else asyncio.ensure_future(until.wait())
    try:
        while until is None or not until.is_set():
            batch = await log.read_after(session, cursor)
            for event in batch:
                if until is not None and until.is_set():
                    return
                yield event
                cursor = event.id
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
