"""`POST /api/feedback`: accept a JSON object, answer 202 only once it is durable.

Status codes, each with a JSON body naming the problem::

    202  {"id": ...}          stored durably (fsynced); a retry with the same Idempotency-Key
                              gets the same id and header `Idempotent-Replayed: true`
    400  invalid JSON (NaN/Infinity and duplicate keys too), invalid UTF-8, not an object,
         malformed Idempotency-Key
    409  the same Idempotency-Key is still being stored by an earlier request
    413  body over `feedback_max_bytes` (checked against Content-Length, then while reading)
    415  not `application/json` (or `application/*+json`), or a charset other than UTF-8
    422  the same Idempotency-Key came with a different body
    503  the disk refused the write (ENOSPC, EIO...), the queue is closed, the idempotency
         index cannot be read (`/api/ready` is 503 meanwhile; a damaged index is quarantined
         and rebuilt empty instead), or the key cannot be checked yet (start-up recovery has
         not succeeded yet: running, or failed and being retried); nothing was acknowledged

Idempotency keys live in three places: in memory while this process holds the record, inside
the record itself (so a crash cannot separate them), and in `<state_dir>/feedback/
idempotency.sqlite3`, written by the drain after the sink committed the record and before its
segment is removed. A retry after a restart therefore finds the key either in a segment that
recovery is re-delivering (keyed requests get 503 until recovery succeeded), in a file another
process holds (its keys are read and kept until the file is gone: `FeedbackQueue.held_key`),
or in the index.
Across two live replicas the index catches a retry once the first record was drained (within
`drain_interval_ms`), or, when that replica died first, once a peer's orphan sweep delivered it
(within `orphan_sweep_ms`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ._errors import DiskWriteError, NotReady, QueueError, UnsafePath
from ._jsonbody import BodyError, check_json_content_type, read_json_body
from ._sqlite import SqliteThread
from ._statefiles import DEFAULT_FILE_MODE
from .config import Settings
from .lifecycle import Lifecycle
from .queue import FeedbackQueue

__all__ = ["IdempotencyIndex", "feedback_routes"]

logger = logging.getLogger("sf_lifecycle.feedback")

T = TypeVar("T")

_KEY_RE = re.compile(r"[A-Za-z0-9._:~+/=-]{1,128}\Z")
#: How long a delivered idempotency key is remembered.
IDEMPOTENCY_TTL_S = 24 * 3600
#: Most expired keys one purge deletes: a purge never holds the index's write lock for long.
PURGE_BATCH = 1_000


def _error(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    headers = {"cache-control": "no-store"}
    if status == 503:
        headers["retry-after"] = "1"
    return JSONResponse({"error": error, "detail": detail, **extra}, status, headers=headers)


@dataclass(slots=True)
class _Entry:
    sha: str
    id: str | None  # None while the first request is still being stored


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
        self._memory: dict[str, _Entry] = {}
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

    async def lookup(self, key: str) -> _Entry | None:
        entry = self._memory.get(key)
        if entry is not None:
            return entry

        def read(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = conn.execute(
                "SELECT id, sha FROM idempotency WHERE key = ? AND ts_ms >= ?",
                (key, self._cutoff_ms()),
            ).fetchone()
            self._maybe_purge(conn)
            return None if row is None else (row[0], row[1])

        found = await self._run(read)
        return None if found is None else _Entry(found[1], found[0])

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
            entry = self._memory.get(key)
            if entry is not None and entry.id == rid:
                del self._memory[key]

    def close(self) -> None:
        self._db.close()


class _FeedbackEndpoint:
    def __init__(self, queue: FeedbackQueue, settings: Settings, index: IdempotencyIndex):
        self.queue = queue
        self.max_bytes = settings.feedback_max_bytes
        self.index = index

    async def handle(self, request: Request) -> Response:
        try:
            check_json_content_type(request)
        except BodyError as exc:
            return exc.response()
        key = request.headers.get("idempotency-key")
        if key is not None and not _KEY_RE.match(key):
            return _error(
                400,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-128 characters from A-Z a-z 0-9 . _ : ~ + / = -",
            )
        try:
            body = await read_json_body(request, self.max_bytes)
        except BodyError as exc:
            return exc.response()
        if not isinstance(body, dict):
            return _error(
                400, "not_an_object", f"body must be a JSON object, got {type(body).__name__}"
            )
        if key is None:
            return await self._store(body, None)
        return await self._store_once(key, body)

    async def _store_once(self, key: str, body: dict[str, Any]) -> Response:
        sha = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
        memory = self.index._memory
        entry = memory.get(key)
        if entry is None:
            if self.queue.recovering:
                return _error(
                    503,
                    "recovering",
                    "start-up recovery has not completed yet, so this key cannot be checked; "
                    "retry shortly",
                )
            held = self.queue.held_key(key)  # a record another process still has to deliver
            try:
                entry = _Entry(*held) if held is not None else await self.index.lookup(key)
            except (sqlite3.Error, OSError) as exc:
                # Never a 500, never a path in the body: the key cannot be checked right now.
                logger.error("idempotency index %s unreadable: %s", self.index.path, exc)
                return _error(
                    503,
                    "idempotency_unavailable",
                    "the idempotency index cannot be read, so this key cannot be checked; "
                    "nothing was stored",
                )
            # The lookup awaited: a concurrent request may have claimed the key meanwhile.
            entry = memory.get(key, entry)
        if entry is not None:
            if entry.sha != sha:
                return _error(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different body",
                )
            if entry.id is None:
                return _error(
                    409, "in_flight", "a request with this Idempotency-Key is still being stored"
                )
            return JSONResponse({"id": entry.id}, 202, headers={"idempotent-replayed": "true"})
        mine = _Entry(sha, None)
        memory[key] = mine
        try:
            response = await self._store(body, {"key": key, "sha": sha})
        except BaseException:
            memory.pop(key, None)
            raise
        if response.status_code == 202:
            mine.id = json.loads(bytes(response.body))["id"]
        else:
            memory.pop(key, None)
        return response

    async def _store(self, body: dict[str, Any], meta: dict[str, Any] | None) -> Response:
        try:
            rid = await self.queue.append(body, meta=meta)
        except DiskWriteError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            return _error(
                503,
                "disk_write_failed",
                f"the record was not stored: {reason}; retry later",
                errno=errno_name(exc.errno),
            )
        except QueueError as exc:
            return _error(503, "queue_closed", str(exc))
        return JSONResponse({"id": rid}, 202)


def errno_name(code: int | None) -> str | None:
    """`ENOSPC` for 28: the symbolic name a client can act on."""
    return None if code is None else errno.errorcode.get(code, str(code))


def feedback_routes(
    queue: FeedbackQueue,
    lifecycle_or_settings: Lifecycle | Settings,
    *,
    path: str = "/api/feedback",
    index: IdempotencyIndex | None = None,
) -> list[BaseRoute]:
    """The `POST /api/feedback` route, storing into `queue`.

    Args:
        queue: The durable queue (install it on the lifecycle so it drains).
        lifecycle_or_settings: Source of `feedback_max_bytes`.
        path: Where to mount the route.
        index: Idempotency index; one in `<state_dir>/feedback/idempotency.sqlite3` when None.
            It is registered as a delivery listener of `queue`.
    """
    settings = (
        lifecycle_or_settings.settings
        if isinstance(lifecycle_or_settings, Lifecycle)
        else lifecycle_or_settings
    )
    if index is None:
        index = IdempotencyIndex(
            queue.dir / "idempotency.sqlite3",
            file_mode=queue.file_mode,
            state_dir=queue.state_dir,
        )
        queue.add_delivery_listener(index.record_delivered)
        queue.on_close(index.close)
    if isinstance(lifecycle_or_settings, Lifecycle):
        lifecycle_or_settings.add_readiness_check("idempotency-index", index.check)
    endpoint = _FeedbackEndpoint(queue, settings, index)
    return [Route(path, endpoint.handle, methods=["POST"])]
