"""The idempotency index: which record an `Idempotency-Key` already created.

`POST /api/feedback` asks it before storing a keyed request (`claim`), and tells it how that
ended (`settle` with the record id, or `release`); the queue tells it which keys were delivered
(`record_delivered`, a delivery listener), and those are written to
`<state_dir>/feedback/idempotency.sqlite3`. A key is thus known

* in memory, from the moment a request claims it until its record was delivered (a second
  request with the key meanwhile gets "in flight" (409) or the same id);
* inside the record itself, so a crash cannot separate them: recovery re-delivers the record
  and writes the key here; another process's undelivered files are asked through `held`
  (`FeedbackQueue.held_key`);
* in the file, for `ttl_s` after delivery.

The queue's wiring (`FeedbackQueue.install`) creates the index beside the queue
(`IdempotencyIndex.for_queue`), which registers it as a delivery listener and closes it with the
queue; `feedback_routes` only uses the index it is given or the one the queue carries.

`KeyIndex` is what the endpoint and the queue's wiring need from an index; `IdempotencyIndex`
(SQLite, one host) and `sf_lifecycle.postgres.PostgresIdempotencyIndex` (shared by replicas on
many hosts) implement it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ._errors import NotReady, UnsafePath
from ._sqlite import SqliteThread
from ._statefiles import DEFAULT_FILE_MODE

if TYPE_CHECKING:
    from ._queue import FeedbackQueue

__all__ = ["IDEMPOTENCY_TTL_S", "PURGE_BATCH", "IdempotencyIndex", "KeyIndex", "KnownKey"]

logger = logging.getLogger("sf_lifecycle.idempotency")

T = TypeVar("T")

#: How long a delivered idempotency key is remembered.
IDEMPOTENCY_TTL_S = 24 * 3600
#: Most expired keys one purge deletes: a purge never holds the index's write lock for long.
PURGE_BATCH = 1_000
#: The index's file name in the queue's folder.
INDEX_FILE = "idempotency.sqlite3"


@dataclass(frozen=True, slots=True)
class KnownKey:
    """What an idempotency key maps to.

    Attributes:
        sha: Hash of the body first sent with the key.
        id: The record's id; None while the first request is still being stored.
        claimed: True when `claim` handed the caller a key whose earlier holder died: the
            caller holds it (settle or release) and must store its record under `id`, the
            id the dead holder may already have stored, so that at most one of the two is
            kept (sinks are idempotent by id).
    """

    sha: str
    id: str | None
    claimed: bool = False


@runtime_checkable
class KeyIndex(Protocol):
    """What `POST /api/feedback` and the queue's wiring need from an idempotency index.

    `claim` raises `sqlite3.Error` or `OSError` (`BackendUnavailable` for a database server)
    when the key cannot be checked: the endpoint answers 503 `idempotency_unavailable` and
    stores nothing. `settle` and `release` never raise (the record's fate is already decided).
    """

    async def claim(
        self,
        key: str,
        sha: str,
        *,
        held: Callable[[str], tuple[str, str] | None] | None = None,
        record_id: str | None = None,
    ) -> KnownKey | None:
        """None: the caller holds `key` (then `settle` or `release`) and stores its record
        under `record_id`; a `KnownKey` with `claimed` set: the caller holds it and stores
        under that key's `id`; else what the key maps to."""
        ...

    def settle(self, key: str, record_id: str) -> None:
        """The claimed key's record is stored as `record_id`."""
        ...

    def release(self, key: str) -> None:
        """The claimed key's record was not stored: the key is free again."""
        ...

    async def lookup(self, key: str) -> KnownKey | None:
        """What `key` maps to, if anything (expired keys are not found)."""
        ...

    async def record_delivered(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Queue delivery listener: persist the keys of a committed batch."""
        ...

    async def check(self) -> dict[str, Any] | None:
        """Readiness check (raise `NotReady` when keyed writes fail for a local reason)."""
        ...

    def describe(self) -> str:
        """Names the index in log lines (no secret)."""
        ...


class IdempotencyIndex:
    """Idempotency key -> (record id, body hash), durable in a small SQLite file.

    A key older than `ttl_s` is not found by `lookup` and is deleted by a purge that runs at
    most every `purge_interval_s`, riding on the index's own calls, and deletes at most
    `PURGE_BATCH` rows (another follows on the next call when there were more): the table
    holds about what was written within the TTL, however long the replica lives.

    A damaged file (not a database, corrupt pages) is moved to the `quarantine` folder beside
    it, never deleted, and an empty index is created: the keys it held are forgotten, so a
    retry of a request stored before the damage can create a second record. That is logged
    (error, naming the file) and it beats refusing every keyed write until an operator acts.

    Args:
        path: Database file.
        ttl_s: Keys older than this are forgotten.
        file_mode: Mode of the database file when this creates it; a link is refused.
        state_dir: The state directory `path` is under: the folders between are checked too.
        purge_interval_s: Least time between two purges (default: a tenth of the TTL, at
            most a minute).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl_s: float = IDEMPOTENCY_TTL_S,
        file_mode: int = DEFAULT_FILE_MODE,
        state_dir: str | os.PathLike[str] | None = None,
        purge_interval_s: float | None = None,
    ):
        self.path = Path(path)
        self.file_mode = file_mode
        self.ttl_s = ttl_s
        self.purge_interval_s = (
            min(ttl_s / 10, 60.0) if purge_interval_s is None else purge_interval_s
        )
        self._next_purge = 0.0  # monotonic; the first call purges
        self._memory: dict[str, KnownKey] = {}  # claimed, or stored and not yet in the file
        #: False until a call succeeded, and after one failed: readiness then probes the file.
        self._usable = False
        root = self.path.parent if state_dir is None else Path(state_dir)
        self._db = SqliteThread(
            self.path,
            self._setup,
            name="sf-idempotency",
            file_mode=file_mode,
            state_dir=root,
            quarantine=(self.path.parent.relative_to(root) / "quarantine").as_posix(),
        )

    @classmethod
    def for_queue(cls, queue: FeedbackQueue, **kwargs: Any) -> IdempotencyIndex:
        """The index in `queue`'s folder, registered as its delivery listener and closed with it.

        Args:
            queue: The queue whose delivered keys the index records.
            **kwargs: Passed to the constructor (`ttl_s`, `purge_interval_s`).
        """
        index = cls(
            queue.dir / INDEX_FILE,
            file_mode=queue.file_mode,
            state_dir=queue.state_dir,
            **kwargs,
        )
        queue.add_delivery_listener(index.record_delivered)
        queue.on_close(index.close)
        return index

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, "
            "id TEXT NOT NULL, sha TEXT NOT NULL, ts_ms INTEGER NOT NULL) WITHOUT ROWID"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS idempotency_ts ON idempotency (ts_ms)")

    def _cutoff_ms(self) -> int:
        return int((time.time() - self.ttl_s) * 1000)

    def _maybe_purge(self, conn: sqlite3.Connection) -> None:
        """Delete up to `PURGE_BATCH` expired keys when a purge is due (index thread)."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                n = conn.execute(
                    "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency "
                    "WHERE ts_ms < ? ORDER BY ts_ms LIMIT ?)",
                    (self._cutoff_ms(), PURGE_BATCH),
                ).rowcount
        except sqlite3.OperationalError as exc:  # busy: never fails the call it rides on
            logger.debug("idempotency index: purge postponed: %s", exc)
            self._next_purge = now + self.purge_interval_s
            return
        # A full batch: more are due, purge again on the next call.
        self._next_purge = now if n >= PURGE_BATCH else now + self.purge_interval_s
        if n:
            logger.debug("idempotency index: %d expired key(s) purged", n)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            result = await self._db.run(fn)
        except BaseException:
            self._usable = False
            raise
        self._usable = True
        return result

    async def lookup(self, key: str) -> KnownKey | None:
        """What `key` maps to in this process or in the file (expired keys are not found).

        Raises:
            sqlite3.Error, OSError: the file cannot be read (`UnsafePath` for a link).
        """
        known = self._memory.get(key)
        if known is not None:
            return known

        def read(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = conn.execute(
                "SELECT id, sha FROM idempotency WHERE key = ? AND ts_ms >= ?",
                (key, self._cutoff_ms()),
            ).fetchone()
            self._maybe_purge(conn)
            return None if row is None else (row[0], row[1])

        found = await self._run(read)
        return None if found is None else KnownKey(found[1], found[0])

    async def claim(
        self,
        key: str,
        sha: str,
        *,
        held: Callable[[str], tuple[str, str] | None] | None = None,
        record_id: str | None = None,
    ) -> KnownKey | None:
        """Claim `key` for a new record with body hash `sha`, unless it is known already.

        Returns None when the caller now holds the key: it must call `settle(key, id)` once
        the record is stored, or `release(key)` when it was not (any exception included),
        else the key stays "in flight". Returns what the key maps to when it is known: being
        stored by another request of this process (`id` None), held in another process's
        undelivered file (`held`), or in the index; nothing is claimed then.

        Args:
            key: The Idempotency-Key.
            sha: Hash of the request body (a different body under a known key is a reuse).
            held: Looks `key` up in records the queue holds but has not delivered yet
                (`FeedbackQueue.held_key`): `(sha, id)` or None. Asked only for a key this
                process does not hold; what it raises propagates, and nothing is claimed.
            record_id: The id the caller will store the record under (unused here: a claim
                of this index lives and dies with this process and is never taken over).

        Raises:
            sqlite3.Error, OSError: the index cannot be read; nothing is claimed.
        """
        known = self._memory.get(key)
        if known is None:
            found = held(key) if held is not None else None
            known = KnownKey(*found) if found is not None else await self.lookup(key)
            # The lookup awaited: a concurrent request may have claimed the key meanwhile.
            known = self._memory.get(key, known)
        if known is not None:
            return known
        self._memory[key] = KnownKey(sha, None)
        return None

    def settle(self, key: str, record_id: str) -> None:
        """The record of a claimed key is stored (acknowledged) as `record_id`: a retry replays
        it. Kept in memory until the delivery listener has written it to the file."""
        known = self._memory.get(key)
        if known is not None and known.id is None:
            self._memory[key] = KnownKey(known.sha, record_id)

    def release(self, key: str) -> None:
        """The record of a claimed key was not stored: the key is free again."""
        known = self._memory.get(key)
        if known is not None and known.id is None:
            del self._memory[key]

    async def check(self) -> dict[str, Any] | None:
        """Readiness: `NotReady` while keyed writes would fail here for a local reason.

        Free once a call succeeded; after a failure (or before the first call) each probe
        tries the file again, which also quarantines a damaged one.
        """
        if self._usable:
            return None
        try:
            await self._run(
                lambda conn: conn.execute("SELECT 1 FROM idempotency LIMIT 1").fetchall()
            )
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, UnsafePath):
                why = "a link or not a regular file (refused)"
            elif isinstance(exc, OSError):  # no path in a probe body
                why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            else:
                why = str(exc)
            raise NotReady(
                f"the idempotency index {self.path.name} cannot be used, so keyed writes "
                f"answer 503: {why}"
            ) from None
        return None

    async def record_delivered(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Queue delivery listener: persist the keys of a committed batch."""
        rows = [(r["key"], r["id"], r["sha"], r.get("ts", 0)) for r in records if r.get("key")]
        if not rows:
            return

        cutoff = self._cutoff_ms()

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                # A key seen again after it expired maps to its new record.
                conn.executemany(
                    "INSERT INTO idempotency (key, id, sha, ts_ms) VALUES (?,?,?,?) "
                    "ON CONFLICT (key) DO UPDATE SET id = excluded.id, sha = excluded.sha, "
                    "ts_ms = excluded.ts_ms WHERE idempotency.ts_ms < ?",
                    [(*row, cutoff) for row in rows],
                )
            self._maybe_purge(conn)

        await self._run(write)
        for key, rid, _, _ in rows:
            known = self._memory.get(key)
            if known is not None and known.id == rid:
                del self._memory[key]

    def describe(self) -> str:
        """The index's file, for log lines."""
        return str(self.path)

    def close(self, wait_s: float = 0.0) -> bool:
        """Close the database; True once it is closed (see `SqliteThread.close` for `wait_s`)."""
        return self._db.close(wait_s)
