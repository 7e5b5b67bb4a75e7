"""One blocking `XREAD` per process for every session that has a waiting stream.

`RedisEventLog.wait` registers here instead of blocking on a connection of its own: a thousand
open SSE streams cost one connection and one `XREAD BLOCK` listing their sessions, not a
thousand blocked connections (which would exhaust the pool, or Redis's `maxclients`).

Deliberate choices:

* **Wake-ups only.** The reader learns that a session has an entry after some position and
  wakes that session's waiters; `follow()` then reads the entries with `XRANGE`. An entry costs
  one extra round trip, but the reader never holds events, and a stream never gets an event
  out of order or twice: positions and replay stay in `follow()`.
* **`COUNT 1` from the oldest waiter's position.** The entry right after the oldest waiting
  position is enough to wake every waiter at that position; a burst of appends then costs one
  wake-up, not one per entry.
* **A new session joins through a private wake stream.** The `XREAD` in flight does not list a
  session registered after it was sent. Rather than cancel it (which drops the connection),
  the registration appends to `<prefix>~wake:<token>`, a stream of this process that the
  `XREAD` always lists from its last seen id: the call returns, and the next one lists the new
  session. Registrations between two calls share one wake-up. A wake appended before the call
  reaches Redis is still seen (it is after the listed id), so no registration is ever missed.
* **Redis errors wake everyone.** A failed `XREAD` marks every watched session failed and wakes
  its waiters: `follow()` reads again, gets `EventStoreUnavailable` and the stream ends with a
  `retry:` hint. The reader retries with a capped backoff while anyone still waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._redact import describe_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["StreamReader"]

logger = logging.getLogger("sf_lifecycle.events.redis")

Position = tuple[int, int]


@dataclass(slots=True)
class _Watched:
    """One session with waiting streams: their positions, what the reader saw, the wake-up."""

    waiters: dict[int, Position | None] = field(default_factory=dict)
    newest: Position | None = None
    failed: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def satisfied(self, pos: Position | None) -> bool:
        """Whether a waiter at `pos` has something to read (or an error to meet)."""
        if self.failed:
            return True
        return self.newest is not None and (pos is None or self.newest > pos)


class StreamReader:
    """The process's multiplexed `XREAD BLOCK` over the sessions that have waiters.

    Args:
        client: A client with a connection of its own for the blocking call (its socket timeout
            must exceed `block_ms`).
        pool: The shared client, used for the wake-up appends.
        prefix: The event log's key prefix (the wake stream is `<prefix>~wake:<token>`).
        block_ms: Longest single `XREAD BLOCK`.
    """

    def __init__(self, client: Redis, pool: Redis, prefix: str, block_ms: int) -> None:
        self._client = client
        self._pool = pool
        self._block_ms = block_ms
        self._wake_key = f"{prefix}~wake:{secrets.token_hex(8)}"
        self._wake_id = "0-0"
        self._sessions: dict[str, _Watched] = {}
        self._tokens = itertools.count()
        self._dirty = False
        self._listed: dict[str, Position] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def watched(self) -> int:
        """Sessions the reader lists in its `XREAD` (for tests and metrics)."""
        return len(self._sessions)

    async def wait(self, key: str, pos: Position | None, timeout_s: float) -> bool:
        """Wait until the stream `key` has an entry after `pos`; False on timeout.

        True also when the reader failed, so that the caller reads and meets the error.
        """
        watched = self._sessions.get(key)
        if watched is None:
            watched = self._sessions[key] = _Watched()
        if watched.satisfied(pos):
            return True
        token = next(self._tokens)
        watched.waiters[token] = pos
        try:
            self._ensure_running()
            listed = self._listed.get(key)
            if listed is None or (pos or (0, 0)) < listed:
                await self._poke()  # the `XREAD` in flight does not cover this waiter
            async with asyncio.timeout(timeout_s):
                while not watched.satisfied(pos):
                    await watched.changed.wait()
            return True
        except TimeoutError:
            return False
        finally:
            del watched.waiters[token]
            if not watched.waiters and self._sessions.get(key) is watched:
                del self._sessions[key]

    async def aclose(self) -> None:
        """Stop the reader (waiters fall back to their timeouts) and close its connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._client.aclose()

    # -- the reader task ---------------------------------------------------------------------
    def _ensure_running(self) -> None:
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="sf-events-redis-reader"
            )

    async def _poke(self) -> None:
        """Make the `XREAD` in flight return, so that the next one lists a new waiter."""
        if self._dirty:
            return
        self._dirty = True
        with contextlib.suppress(Exception):  # the reader meets the same error and reports it
            await self._pool.xadd(self._wake_key, {"w": "1"}, maxlen=16, approximate=False)
            await self._pool.pexpire(self._wake_key, self._block_ms * 4 + 60_000)

    def _streams(self) -> dict[Any, Any]:
        streams: dict[Any, Any] = {self._wake_key: self._wake_id}
        self._listed = {}
        for key, watched in self._sessions.items():
            waiting = [p for p in watched.waiters.values() if not watched.satisfied(p)]
            if not waiting:
                continue
            known = [p for p in waiting if p is not None]
            start = min(known) if len(known) == len(waiting) else (0, 0)
            streams[key] = f"{start[0]}-{start[1]}"
            self._listed[key] = start
        return streams

    async def _run(self) -> None:
        backoff = 0.05
        failing = False
        while self._sessions:
            self._dirty = False
            streams = self._streams()
            try:
                reply = await self._client.xread(streams, count=1, block=self._block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listed = {}
                if not failing:
                    logger.warning("event store: blocking read failed: %s", describe_error(exc))
                failing = True
                for watched in self._sessions.values():
                    watched.failed = True
                    watched.notify()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if failing:
                logger.info("event store: blocking read works again")
                failing, backoff = False, 0.05
                for watched in self._sessions.values():
                    watched.failed = False
            items = reply.items() if isinstance(reply, dict) else (reply or ())
            for raw_key, entries in items:
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                raw_id = entries[-1][0]
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                if key == self._wake_key:
                    self._wake_id = entry_id
                    continue
                found = self._sessions.get(key)
                if found is None:
                    continue
                watched = found
                epoch, _, seq = entry_id.partition("-")
                pos = (int(epoch), int(seq))
                if watched.newest is None or pos > watched.newest:
                    watched.newest = pos
                watched.notify()
        self._listed = {}
