"""Where drained feedback goes: the `Sink` protocol and the embedded SQLite default.

A sink is any async callable that takes a batch of records and returns once the batch is
committed. It must be idempotent by `record["id"]`: after a crash the queue redelivers whatever it
could not prove was delivered (at-least-once), and the sink turns that into effectively-once.

`SqliteSink` stores records in `<state_dir>/feedback.sqlite3`, one transaction per batch, WAL and
`synchronous=FULL` (a commit is on disk when it returns), `INSERT OR IGNORE` by id. SQLite calls
run on one dedicated thread (`_sqlite.SqliteThread`) so the event loop never waits on the disk.

A PostgreSQL sink would be the same shape: `INSERT ... ON CONFLICT (id) DO NOTHING` in one
transaction per batch.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from . import _crashpoints as _cp
from ._sqlite import SqliteThread
from ._statefiles import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE

__all__ = ["Sink", "SqliteSink", "count_records"]


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
        self._db = SqliteThread(
            self.path,
            lambda conn: conn.execute(_SCHEMA),
            name="sf-sqlite-sink",
            busy_timeout_ms=busy_timeout_ms,
            open_timeout_s=open_timeout_s,
            file_mode=file_mode,
            dir_mode=dir_mode,
        )

    def _write(self, conn: sqlite3.Connection, records: Sequence[Mapping[str, Any]]) -> None:
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
        await self._db.run(lambda conn: self._write(conn, records))

    async def ids(self) -> list[str]:
        """Every stored id, in id (time) order; for tests and tools."""

        return await self._db.run(
            lambda conn: [row[0] for row in conn.execute("SELECT id FROM feedback ORDER BY id")]
        )

    def close(self, wait_s: float = 0.0) -> bool:
        """Close the connection and the thread (pending calls finish first).

        Args:
            wait_s: How long to wait for the connection to be closed; 0 (the default, right
                on an event loop) does not wait.

        Returns:
            True when the connection is closed by the time this returns.
        """
        return self._db.close(wait_s)


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
