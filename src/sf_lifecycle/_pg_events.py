"""`PostgresEventLog`: session events in PostgreSQL, for replicas that share no filesystem.

The same `EventLog` contract as `FileEventLog` (`_events.py`): ids `"<epoch>-<seq>"`, dense
`seq` per session, replay then live through `follow()`, and a `lost` event for a position the
log cannot serve (older than retention, another epoch, past the end).

Two tables:

* `<table>_sessions (session, epoch, head, floor)`: one row per session. An append bumps
  `head` with `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` in the transaction that inserts
  the event, so the row lock orders appends: seq is allocated in commit order, a rolled-back
  append rolls back its number too, and no reader ever sees seq n+1 before n.
* `<table> (session, seq, ts_ms, data)`, primary key `(session, seq)`: the events. `data` is the
  JSON text as the publisher sent it (no jsonb rewriting of the SSE `data:` line).

Retention is exact for readers (the floor is computed at read time from `head`, the count and
the age) and lazy in the table: an append deletes its session's rows beyond retention once the
excess reaches a quarter, and records the highest deleted seq in `floor`.

Waiting: one `LISTEN` connection per log receives `NOTIFY <channel>, '<session>'` sent by
every append's transaction (delivered at commit), and wakes the waiters of that session. A
waiter registers before it re-reads `head`, so a notification cannot fall between the two.
When the listening connection is lost, waits fall back to polling `head` every `poll_ms`
until it is back.

A server that does not answer raises `EventStoreUnavailable` (as `RedisEventLog` does): the
SSE layer answers a publish 503 `event_store_unavailable` and ends open streams with a
`retry:` hint; clients resume with `Last-Event-ID` once the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from ._errors import BackendUnavailable, EventStoreUnavailable
from ._events import Event, lost_event, parse_event_id, validate_session_id
from ._pg import Database, check_identifier
from ._redact import describe_error

__all__ = ["PostgresEventLog"]

logger = logging.getLogger("sf_lifecycle.events.postgres")


@contextlib.contextmanager
def _unavailable_as_event_store() -> Iterator[None]:
    """The event-log contract's error for a store that cannot be reached."""
    try:
        yield
    except BackendUnavailable as exc:
        raise EventStoreUnavailable(f"event store {exc.args[0] if exc.args else exc}") from exc


class PostgresEventLog:
    """An `EventLog` in PostgreSQL.

    Args:
        db: The process's pool.
        retention_events: Events per session a reader can still resume from.
        retention_ms: Age after which an event can no longer be resumed from.
        table: Events table; the sessions table is `<table>_sessions` (plain identifiers).
        poll_ms: Wait's polling period while the LISTEN connection is down.
    """

    def __init__(
        self,
        db: Database,
        retention_events: int = 10_000,
        retention_ms: int = 3_600_000,
        *,
        table: str = "sf_events",
        poll_ms: int = 250,
    ) -> None:
        from psycopg import sql

        if retention_events < 1 or retention_ms < 1 or poll_ms < 1:
            raise ValueError("retention_events, retention_ms and poll_ms must be positive")
        self.db = db
        self.retention_events = retention_events
        self.retention_ms = retention_ms
        self.table = check_identifier(table, "table")
        self.poll_s = poll_ms / 1000
        self.channel = self.table
        ev, ss = sql.Identifier(self.table), sql.Identifier(f"{self.table}_sessions")
        self._create = [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (session text PRIMARY KEY, epoch bigint NOT NULL,"
                " head bigint NOT NULL, floor bigint NOT NULL DEFAULT 0)"
            ).format(ss),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (session text NOT NULL, seq bigint NOT NULL, "
                "ts_ms bigint NOT NULL, data text NOT NULL, PRIMARY KEY (session, seq))"
            ).format(ev),
        ]
        self._bump = sql.SQL(
            "INSERT INTO {ss} AS s (session, epoch, head) VALUES (%s, %s, 1) "
            "ON CONFLICT (session) DO UPDATE SET head = s.head + 1 RETURNING epoch, head, floor"
        ).format(ss=ss)
        self._insert = sql.SQL(
            "INSERT INTO {} (session, seq, ts_ms, data) VALUES (%s,%s,%s,%s)"
        ).format(ev)
        self._notify = sql.SQL("SELECT pg_notify(%s, %s)")
        self._prune = sql.SQL(
            "WITH gone AS (DELETE FROM {ev} WHERE session = %s AND (seq <= %s OR ts_ms < %s) "
            "RETURNING seq) UPDATE {ss} SET floor = greatest(floor, (SELECT max(seq) FROM gone))"
            " WHERE session = %s AND EXISTS (SELECT 1 FROM gone)"
        ).format(ev=ev, ss=ss)
        self._select_head = sql.SQL("SELECT epoch, head, floor FROM {} WHERE session = %s").format(
            ss
        )
        self._after = sql.SQL(
            "SELECT seq, ts_ms, data FROM {} WHERE session = %s AND seq > %s ORDER BY seq"
        ).format(ev)
        self._age_floor = sql.SQL(
            "SELECT max(seq) FROM {} WHERE session = %s AND ts_ms < %s"
        ).format(ev)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any, db: Database, **kwargs: Any) -> PostgresEventLog:
        """Build from `Settings` (the two `sse_retention_*` settings)."""
        return cls(db, settings.sse_retention_events, settings.sse_retention_ms, **kwargs)

    async def _ensure(self) -> None:
        async def create(conn: Any) -> None:
            for statement in self._create:
                await conn.execute(statement)

        await self.db.ensure(f"events:{self.table}", create)

    # -- EventLog ------------------------------------------------------------------------------
    async def append(self, session: str, data: Any) -> str:
        """Append a JSON value to `session`; returns its id once committed.

        Raises:
            InvalidSessionId: not a valid session id.
            ValueError, TypeError: `data` is not JSON (NaN and Infinity included).
            EventStoreUnavailable: the server did not answer; nothing was appended.
        """
        validate_session_id(session)
        data_json = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        with _unavailable_as_event_store():
            return await self._append(session, data_json)

    async def _append(self, session: str, data_json: str) -> str:
        await self._ensure()
        now = int(time.time() * 1000)
        async with self.db.connection() as conn, conn.transaction():
            cur = await conn.execute(self._bump, (session, now))
            row = await cur.fetchone()
            assert row is not None
            epoch, seq, floor = int(row[0]), int(row[1]), int(row[2])
            await conn.execute(self._insert, (session, seq, now, data_json))
            excess = seq - self.retention_events - floor
            if excess >= max(1, self.retention_events // 4):
                cutoff = seq - self.retention_events
                await conn.execute(self._prune, (session, cutoff, now - self.retention_ms, session))
            await conn.execute(self._notify, (self.channel, session))
        return f"{epoch}-{seq}"

    async def _head(self, session: str) -> tuple[int, int, int] | None:
        await self._ensure()
        async with self.db.connection() as conn:
            cur = await conn.execute(self._select_head, (session,))
            row = await cur.fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """Retained events after `last_id` (all when None), oldest first; a leading `lost`
        event for a position the log cannot serve (see `_events.EventLog`)."""
        validate_session_id(session)
        pos = None if last_id is None else parse_event_id(last_id)
        with _unavailable_as_event_store():
            return await self._read_after(session, last_id, pos)

    async def _read_after(
        self, session: str, last_id: str | None, pos: tuple[int, int] | None
    ) -> list[Event]:
        await self._ensure()
        now = int(time.time() * 1000)
        async with self.db.connection() as conn, conn.transaction():
            # One snapshot for the head and the rows (REPEATABLE READ).
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur = await conn.execute(self._select_head, (session,))
            row = await cur.fetchone()
            if row is None:
                return [] if pos is None else [lost_event(None, now, "reset", last_id, None)]
            epoch, head, stored_floor = int(row[0]), int(row[1]), int(row[2])
            cur = await conn.execute(self._age_floor, (session, now - self.retention_ms))
            aged = (await cur.fetchone() or (None,))[0]
            floor = max(stored_floor, head - self.retention_events, int(aged or 0))
            out: list[Event] = []
            if pos is None:
                seq = floor
            elif pos[0] != epoch:
                out.append(lost_event(f"{epoch}-{floor}", now, "reset", last_id, None))
                seq = floor
            else:
                seq = pos[1]
                if seq > head:
                    return [lost_event(f"{epoch}-{head}", now, "ahead", last_id, None)]
                if seq < floor:
                    out.append(lost_event(f"{epoch}-{floor}", now, "expired", last_id, floor - seq))
                    seq = floor
            cur = await conn.execute(self._after, (session, seq))
            for s, ts_ms, data in await cur.fetchall():
                out.append(Event(f"{epoch}-{s}", data, int(ts_ms)))
        return out

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """Wait until something after `last_id` may be readable; False on timeout."""
        validate_session_id(session)
        pos = None if last_id is None else parse_event_id(last_id)
        self._start_listener()
        flag = asyncio.Event()
        waiters = self._waiters.setdefault(session, set())
        waiters.add(flag)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                # Registered first: an append committed after this read wakes the flag.
                with _unavailable_as_event_store():
                    head = await self._head(session)
                if self._has_after(head, pos):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                step = remaining if self._listening else min(remaining, self.poll_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flag.wait(), step)
                flag.clear()
        finally:
            waiters.discard(flag)
            if not waiters:
                self._waiters.pop(session, None)

    @staticmethod
    def _has_after(head: tuple[int, int, int] | None, pos: tuple[int, int] | None) -> bool:
        if head is None:
            return False
        if pos is None:
            return head[1] > 0
        return pos[0] != head[0] or pos[1] != head[1]

    # -- LISTEN --------------------------------------------------------------------------------
    def _start_listener(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="sf-pg-events-listen"
            )

    async def _listen(self) -> None:
        """Hold a LISTEN connection and wake waiters; reconnect (with backoff) when lost."""
        import psycopg
        from psycopg import sql

        delay = self.poll_s
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.db.url, **self.db.connect_kwargs()
                )
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self._listening = True
                    delay = self.poll_s
                    self._wake_all()  # anything appended while nobody listened
                    async for note in conn.notifies():
                        for flag in self._waiters.get(note.payload, ()):
                            flag.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._listening:
                    logger.warning(
                        "event log: LISTEN connection lost (%s); polling every %.0f ms until "
                        "it is back",
                        describe_error(exc),
                        self.poll_s * 1000,
                    )
            finally:
                self._listening = False
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _wake_all(self) -> None:
        for flags in self._waiters.values():
            for flag in flags:
                flag.set()

    async def aclose(self) -> None:
        """Stop listening (the pool is the `Database`'s to close)."""
        self._closed = True
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
