"""Where drained feedback goes: the `Sink` protocol and the embedded SQLite default.

A sink is any async callable that takes a batch of records and returns once the batch is
committed. It must be idempotent by `record["id"]`: after a crash the queue redelivers whatever it
could not prove was delivered (at-least-once), and the sink turns that into effectively-once.

`SqliteSink` stores records in `<state_dir>/feedback.sqlite3`, one transaction per batch, WAL and
`synchronous=FULL` (a commit is on disk when it returns), `INSERT OR IGNORE` by id. SQLite calls
run on one dedicated thread so the event loop never waits on the disk. Opening retries on
"database is locked": two replicas starting at once on a fresh volume both try to create the file
and switch it to WAL, and the loser must wait, not crash.

A PostgreSQL sink would be the same shape: `INSERT ... ON CONFLICT (id) DO NOTHING` in one
transaction per batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from . import _crashpoints as _cp
from ._statefiles import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, create_private, refuse_link

__all__ = ["Sink", "SqliteSink", "count_records"]

logger = logging.getLogger("sf_lifecycle.sink")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id      TEXT PRIMARY KEY,
    ts_ms   INTEGER NOT NULL,
    idem_key TEXT,
    body    TEXT NOT NULL
) WITHOUT ROWID
"""


@runtime_checkable
class Sink(Protocol):
    """Receives batches of drained records; returns only once they are committed.

    Must be idempotent by `record["id"]` (a batch can be delivered again after a crash) and
    raise on failure (the batch then stays queued and is retried).
    """

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None: ...


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SqliteSink:
    """The default sink: a SQLite table of records keyed by id.

    Args:
        path: Database file (created with its folder when missing).
        busy_timeout_ms: How long a write waits for another process's transaction.
        open_timeout_s: How long opening retries while a peer creates the database.
        file_mode: Mode of the database file when this creates it (SQLite gives its `-wal`
            and `-shm` files the same); a symbolic link in its place is refused (`UnsafePath`).
        dir_mode: Mode of its folder when this creates it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 10_000,
        open_timeout_s: float = 30.0,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
    ) -> None:
        self.path = Path(path)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.busy_timeout_ms = busy_timeout_ms
        self.open_timeout_s = open_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sf-sqlite-sink")

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
        create_private(self.path, self.file_mode)
        for suffix in ("-wal", "-shm", "-journal"):
            refuse_link(self.path.with_name(self.path.name + suffix))
        deadline = time.monotonic() + self.open_timeout_s
        delay = 0.01
        while True:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(_SCHEMA)
            except sqlite3.OperationalError as exc:
                conn.close()
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise
                logger.debug("database %s busy while opening; retrying", self.path)
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            self._conn = conn
            return conn

    def _write(self, records: Sequence[Mapping[str, Any]]) -> None:
        conn = self._connect()
        dumps = json.dumps
        rows = [
            (
                r["id"],
                r.get("ts", 0),
                r.get("key"),
                dumps(r.get("data"), ensure_ascii=False, separators=(",", ":")),
            )
            for r in records
        ]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO feedback (id, ts_ms, idem_key, body) VALUES (?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if _cp.ARMED:
            _cp.hit("sink.before_commit")  # a transaction open, nothing committed
        conn.execute("COMMIT")

    async def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Commit `records` in one transaction (ignoring ids already stored)."""
        if not records:
            return
        await asyncio.get_running_loop().run_in_executor(self._thread, self._write, records)

    async def ids(self) -> list[str]:
        """Every stored id, in id (time) order; for tests and tools."""

        def read() -> list[str]:
            cur = self._connect().execute("SELECT id FROM feedback ORDER BY id")
            return [row[0] for row in cur]

        return await asyncio.get_running_loop().run_in_executor(self._thread, read)

    def close(self) -> None:
        """Close the connection and the thread (pending calls finish first)."""

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._thread.submit(shut).result()
        self._thread.shutdown(wait=True)


def count_records(path: str | os.PathLike[str]) -> int:
    """Rows in a `SqliteSink` database (read-only; for `sf-lifecycle queue status`)."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10)
    try:
        (n,) = conn.execute("SELECT count(*) FROM feedback").fetchone()
        return int(n)
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
