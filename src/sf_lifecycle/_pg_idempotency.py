"""`PostgresIdempotencyIndex`: the `Idempotency-Key` index shared by replicas on many hosts.

The SQLite index (`idempotency.IdempotencyIndex`) learns a key when its record is delivered;
another host sees it only then. Here the key is written when it is *claimed*, before the record
is stored, so a retry that lands on any replica finds it at once:

* `claim` inserts `(key, sha, owner, pending)` with no id; `pending` is the record id the
  claimer allocated before claiming. A key already there answers what it maps to: a different
  body is a reuse (422), no id yet is "in flight" (409), an id replays it (202). A claim left
  without an id for `claim_timeout_s` (its replica died, maybe after storing the record) can
  be taken over by a request with the same body, which stores its record under the claim's
  `pending` id: if the dead replica's record is recovered later, the sink keeps one of the
  two (idempotent by id), so one key never makes two records. A key older than `ttl_s` is
  forgotten and starts afresh.
* `settle` (record stored) and `release` (not stored) are decided already when they run, so
  they never fail the request. Releasing a fresh claim deletes it; releasing a claim taken
  over keeps its row and `pending` id and marks it abandoned again (no owner, back-dated by
  `claim_timeout_s`), so the next retry, on any replica, takes it over at once under that same
  id: the dead replica's record may still be recovered, and a new id would make it a second
  row. In both cases the row is updated in the background, and the delivery listener
  (`record_delivered`) writes the id again once the sink committed the record, which also heals
  a settle lost to an outage.

Times are the server's (`now()`), so replicas' clocks do not matter. When PostgreSQL is down a
keyed write answers 503 `idempotency_unavailable` (retryable, nothing stored) while unkeyed
writes are still acknowledged to the local queue; readiness stays green (every replica shares
the outage, and taking them all out of the pool would refuse the writes that still work), and
the ready body names the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._pg import Database, check_identifier, redact_url
from ._redact import describe_error
from .idempotency import IDEMPOTENCY_TTL_S, PURGE_BATCH, KnownKey

if TYPE_CHECKING:
    from ._queue import FeedbackQueue

__all__ = ["PostgresIdempotencyIndex"]

logger = logging.getLogger("sf_lifecycle.idempotency")


class PostgresIdempotencyIndex:
    """Idempotency key -> (record id, body hash) in a PostgreSQL table.

    Args:
        db: The process's pool.
        table: Table name (a plain identifier; created when missing).
        ttl_s: Keys older than this are forgotten (and purged, `PURGE_BATCH` at a time).
        claim_timeout_s: A claim still without an id after this long may be taken over.
    """

    def __init__(
        self,
        db: Database,
        *,
        table: str = "sf_idempotency",
        ttl_s: float = IDEMPOTENCY_TTL_S,
        claim_timeout_s: float = 60.0,
    ) -> None:
        from psycopg import sql

        self.db = db
        self.table = check_identifier(table, "table")
        self.ttl_s = ttl_s
        self.claim_timeout_s = claim_timeout_s
        self.owner = secrets.token_hex(8)  # this process's claims
        self._memory: dict[str, KnownKey] = {}  # claimed here, not yet delivered
        self._inherited: set[str] = set()  # of those, claims taken over (a pending id kept)
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_purge = 0.0
        self.last_error: str | None = None
        t = sql.Identifier(self.table)
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, sha text NOT NULL, id text, "
            "owner text, created_at timestamptz NOT NULL DEFAULT now(), pending text)"
        ).format(t)
        # Tables made before `pending` existed (the id a claim will be stored under).
        self._migrate = sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS pending text").format(t)
        self._index = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (created_at)").format(
            sql.Identifier(f"{self.table}_created_at"), t
        )
        # Claimed when new, expired, or a claim abandoned without an id for the same body;
        # the taker of an abandoned claim inherits its pending id (the record the dead
        # holder may have stored), an expired key starts afresh.
        self._claim = sql.SQL(
            "INSERT INTO {t} AS o (key, sha, id, owner, pending) VALUES (%(key)s, %(sha)s, "
            "NULL, %(owner)s, %(pending)s) ON CONFLICT (key) DO UPDATE SET sha = excluded.sha, "
            "id = NULL, owner = excluded.owner, created_at = now(), pending = CASE "
            "WHEN o.created_at < now() - make_interval(secs => %(ttl)s) THEN excluded.pending "
            "ELSE coalesce(o.pending, excluded.pending) END "
            "WHERE o.created_at < now() - make_interval(secs => %(ttl)s) "
            "OR (o.id IS NULL AND o.sha = excluded.sha "
            "AND o.created_at < now() - make_interval(secs => %(claim)s)) "
            "RETURNING owner, pending"
        ).format(t=t)
        self._lookup = sql.SQL(
            "SELECT sha, id FROM {} WHERE key = %s "
            "AND created_at >= now() - make_interval(secs => %s)"
        ).format(t)
        self._settle = sql.SQL(
            "UPDATE {} SET id = %s WHERE key = %s AND owner = %s AND id IS NULL"
        ).format(t)
        self._release = sql.SQL(
            "DELETE FROM {} WHERE key = %s AND owner = %s AND id IS NULL"
        ).format(t)
        # A claim taken over carries an id the dead holder may have stored: keep it, abandoned.
        self._abandon = sql.SQL(
            "UPDATE {} SET owner = NULL, created_at = now() - make_interval(secs => %s) "
            "WHERE key = %s AND owner = %s AND id IS NULL"
        ).format(t)
        self._delivered = sql.SQL(
            "INSERT INTO {t} AS o (key, sha, id, created_at) "
            "SELECT k, s, i, to_timestamp(ts / 1000.0) "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[]) AS r(k, s, i, ts) "
            "ON CONFLICT (key) DO UPDATE SET id = excluded.id, sha = excluded.sha, owner = NULL "
            "WHERE o.id IS NULL OR o.created_at < now() - make_interval(secs => %s)"
        ).format(t=t)
        self._purge = sql.SQL(
            "DELETE FROM {t} WHERE key IN (SELECT key FROM {t} "
            "WHERE created_at < now() - make_interval(secs => %s) ORDER BY created_at LIMIT %s)"
        ).format(t=t)

    @classmethod
    def for_queue(
        cls, queue: FeedbackQueue, db: Database, **kwargs: Any
    ) -> PostgresIdempotencyIndex:
        """An index wired beside `queue` (`queue.idempotency`, before `queue.install`): it
        records the queue's deliveries and `feedback_routes` uses it."""
        index = cls(db, **kwargs)
        queue.add_delivery_listener(index.record_delivered)
        queue.idempotency = index
        return index

    def describe(self) -> str:
        return f"table {self.table} at {redact_url(self.db.url)}"

    async def _ensure(self) -> None:
        async def create(conn: Any) -> None:
            await conn.execute(self._create)
            await conn.execute(self._migrate)
            await conn.execute(self._index)

        await self.db.ensure(f"idempotency:{self.table}", create)

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        try:
            await self._ensure()
            async with self.db.connection() as conn:
                result = await fn(conn)
        except Exception as exc:
            self.last_error = describe_error(exc)
            raise
        self.last_error = None
        return result

    async def lookup(self, key: str) -> KnownKey | None:
        """What `key` maps to (claimed here, or in the table and not expired).

        Raises:
            BackendUnavailable: the server did not answer.
        """
        known = self._memory.get(key)
        if known is not None:
            return known

        async def read(conn: Any) -> tuple[str, str | None] | None:
            cur = await conn.execute(self._lookup, (key, self.ttl_s))
            row = await cur.fetchone()
            await self._maybe_purge(conn)
            return None if row is None else (row[0], row[1])

        found = await self._call(read)
        return None if found is None else KnownKey(found[0], found[1])

    async def claim(
        self,
        key: str,
        sha: str,
        *,
        held: Callable[[str], tuple[str, str] | None] | None = None,
        record_id: str | None = None,
    ) -> KnownKey | None:
        """Claim `key` in the table, unless some replica knows it already (see the module).

        `held` is asked first (it raises while start-up recovery runs: keyed writes answer 503
        "recovering" as with the SQLite index). `record_id`, the id the caller will store
        under, is written with the claim; a caller that takes over a claim its holder
        abandoned gets `KnownKey(sha, <that claim's id>, claimed=True)` and stores under it.

        Raises:
            BackendUnavailable: the server did not answer; nothing is claimed.
        """
        known = self._memory.get(key)
        if known is not None:
            return known
        found = held(key) if held is not None else None
        if found is not None:
            return KnownKey(*found)
        params = {"key": key, "sha": sha, "owner": self.owner, "ttl": self.ttl_s}
        params.update(claim=self.claim_timeout_s, pending=record_id)

        async def attempt(conn: Any) -> KnownKey | bool | None:
            cur = await conn.execute(self._claim, params)
            row = await cur.fetchone()
            if row is not None and row[0] == self.owner:
                pending = row[1]
                return None if pending is None or pending == record_id else pending
            cur = await conn.execute(self._lookup, (key, self.ttl_s))
            other = await cur.fetchone()
            return False if other is None else KnownKey(other[0], other[1])

        for _ in range(3):  # a release between our insert and our read: claim again
            outcome = await self._call(attempt)
            if outcome is None or isinstance(outcome, str):
                if key in self._memory:  # a concurrent request of ours claimed it meanwhile
                    return self._memory[key]
                self._memory[key] = KnownKey(sha, None)
                if isinstance(outcome, str):
                    self._inherited.add(key)
                    logger.warning(
                        "idempotency key %s: claim taken over from a replica that did not "
                        "settle it within %.0f s; stored as %s, the id it may have stored",
                        key,
                        self.claim_timeout_s,
                        outcome,
                    )
                    return KnownKey(sha, outcome, claimed=True)
                return None
            if outcome is not False:
                assert isinstance(outcome, KnownKey)
                return outcome
        return KnownKey(sha, None)  # churning: answer "in flight", the client retries

    def _background(self, what: str, statement: Any, params: tuple[Any, ...]) -> None:
        async def run() -> None:
            try:
                async with self.db.connection() as conn:
                    await conn.execute(statement, params)
            except Exception as exc:
                # The delivery listener writes the id again once the record is delivered.
                logger.warning("idempotency index: %s postponed: %s", what, describe_error(exc))

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def settle(self, key: str, record_id: str) -> None:
        """The claimed key's record is stored: map it to `record_id` (in the background)."""
        known = self._memory.get(key)
        if known is not None and known.id is None:
            self._inherited.discard(key)
            self._memory[key] = KnownKey(known.sha, record_id)
            self._background("settle", self._settle, (record_id, key, self.owner))

    def release(self, key: str) -> None:
        """The claimed key's record was not stored here (in the background): a fresh claim is
        deleted, a claim taken over is left abandoned with its pending id (see the module)."""
        known = self._memory.get(key)
        if known is not None and known.id is None:
            del self._memory[key]
            if key in self._inherited:
                self._inherited.discard(key)
                params = (self.claim_timeout_s, key, self.owner)
                self._background("release", self._abandon, params)
            else:
                self._background("release", self._release, (key, self.owner))

    async def record_delivered(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Queue delivery listener: the delivered keys map to their records."""
        rows = [r for r in records if r.get("key")]
        if not rows:
            return
        args = (
            [r["key"] for r in rows],
            [r["sha"] for r in rows],
            [r["id"] for r in rows],
            [int(r.get("ts", 0)) for r in rows],
            self.ttl_s,
        )

        async def write(conn: Any) -> None:
            await conn.execute(self._delivered, args)

        await self._call(write)
        for r in rows:
            known = self._memory.get(r["key"])
            if known is not None and known.id == r["id"]:
                del self._memory[r["key"]]

    async def _maybe_purge(self, conn: Any) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        cur = await conn.execute(self._purge, (self.ttl_s, PURGE_BATCH))
        full = cur.rowcount >= PURGE_BATCH
        self._next_purge = now if full else now + min(self.ttl_s / 10, 60.0)

    async def check(self) -> dict[str, Any] | None:
        """Readiness detail, never a failure: the last error of the index, if any."""
        return {"backend": "postgresql", "last_error": self.last_error}

    async def aclose(self) -> None:
        """Let background settles finish (at most a second)."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._tasks), 1.0)
