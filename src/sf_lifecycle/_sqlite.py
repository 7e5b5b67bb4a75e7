"""One SQLite connection, used from one dedicated thread: what the sink and the idempotency
index both need.

SQLite calls block on the disk (`synchronous=FULL` fsyncs on commit), so they run on a thread of
their own and the event loop never waits. Opening retries on "database is locked": two replicas
starting at once on a fresh volume both try to create the file and switch it to WAL, and the
loser must wait, not crash. The file is created with a private mode and never through a link.

A database that can be rebuilt (the idempotency index, not the sink) names a `quarantine`
folder: when SQLite calls the file damaged (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) it is moved
there whole, with its `-wal`, `-shm` and `-journal`, never deleted, and an empty one is
created. Such a connection also checks, before each call, that the name still refers to the
file it opened, so a replica whose peer quarantined the file reopens the new one instead of
writing into the quarantined copy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ._statefiles import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    create_private,
    refuse_link,
    state_subdir,
)

__all__ = ["SqliteThread"]

logger = logging.getLogger("sf_lifecycle.sqlite")

T = TypeVar("T")


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is not a database, or a damaged one."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


_SIDE_FILES = ("-wal", "-shm", "-journal")


class SqliteThread:
    """A lazily opened WAL, `synchronous=FULL` connection and the one thread that uses it.

    Args:
        path: Database file.
        setup: Run once on each new connection (create tables, prune); may raise "locked".
        name: Thread name, for stack dumps.
        busy_timeout_ms: How long a write waits for another process's transaction.
        open_timeout_s: How long opening retries while a peer creates the database.
        file_mode: Mode of the file when this creates it (SQLite gives `-wal`/`-shm` the same).
        dir_mode: Create the folder with this mode when missing; None: it must exist.
        state_dir: When `path` is below this folder, every folder between them is checked
            (no link, a real folder) right before opening: `UnsafePath` otherwise.
        quarantine: Folder under `state_dir` (`"feedback/quarantine"`) where a damaged file is
            moved before an empty one is created; None: damage is raised to the caller.
    """

    def __init__(
        self,
        path: Path,
        setup: Callable[[sqlite3.Connection], object],
        *,
        name: str,
        busy_timeout_ms: int = 10_000,
        open_timeout_s: float = 30.0,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int | None = None,
        state_dir: Path | None = None,
        quarantine: str | None = None,
    ) -> None:
        if quarantine is not None and state_dir is None:
            raise ValueError("quarantine needs state_dir")
        self.quarantine = quarantine
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self.dir_mode = dir_mode
        self.state_dir = state_dir
        self.path = path
        self._setup = setup
        self.busy_timeout_ms = busy_timeout_ms
        self.open_timeout_s = open_timeout_s
        self.file_mode = file_mode
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._shut: concurrent.futures.Future[None] | None = None  # the close, once submitted
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    def connection(self) -> sqlite3.Connection:
        """The connection, opened on first use. Call only from this object's thread."""
        if self._conn is not None:
            if self.quarantine is None or self._same_file():
                return self._conn
            logger.info("%s was replaced (quarantined by a peer?); reopening it", self.path)
            self._drop()
        if self.state_dir is not None and self.path.parent != self.state_dir:
            rel = self.path.parent.relative_to(self.state_dir).as_posix()
            state_subdir(self.state_dir, rel, self.dir_mode or DEFAULT_DIR_MODE)
        elif self.dir_mode is not None:
            self.path.parent.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
        create_private(self.path, self.file_mode)
        for suffix in _SIDE_FILES:
            refuse_link(self.path.with_name(self.path.name + suffix))
        st = os.stat(self.path, follow_symlinks=False)
        self._ident = (st.st_dev, st.st_ino)
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
                self._setup(conn)
            except sqlite3.Error as exc:
                conn.close()
                if (
                    not isinstance(exc, sqlite3.OperationalError)
                    or not _is_locked(exc)
                    or time.monotonic() > deadline
                ):
                    raise
                logger.debug("database %s busy while opening; retrying", self.path)
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            self._conn = conn
            return conn

    def _same_file(self) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self.connection())
        except sqlite3.DatabaseError as exc:
            if self.quarantine is None or not _is_damage(exc):
                raise
            self._drop()
            self._set_aside(str(exc))
            return fn(self.connection())  # on the new, empty file

    def _set_aside(self, reason: str) -> None:
        """Move the damaged file (and its side files) to the quarantine folder, never delete.

        Only when the name still refers to the file judged: a peer may have moved it first and
        created a good one, which must not be moved in turn.
        """
        assert self.state_dir is not None
        assert self.quarantine is not None
        if not self._same_file():
            return
        folder = state_subdir(self.state_dir, self.quarantine, self.dir_mode or DEFAULT_DIR_MODE)
        stamp = f"{self.path.name}.{time.time_ns() // 1_000_000}"
        n = 0
        target = folder / stamp
        while os.path.lexists(target):
            n += 1
            target = folder / f"{stamp}.{n}"
        os.rename(self.path, target)
        for suffix in _SIDE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path.with_name(self.path.name + suffix), f"{target}{suffix}")
        logger.error(
            "%s is damaged (%s); moved to %s and replaced by an empty database",
            self.path,
            reason,
            target,
        )

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._call(fn)
        )

    def close(self, wait_s: float = 0.0) -> bool:
        """Close the connection and the thread, waiting at most `wait_s` for them.

        Calls already submitted finish first, then the connection closes on its thread. Not
        waiting (the default) matters at shutdown: this runs on the event loop, and a call
        blocked on another process's lock (up to `busy_timeout_ms`) would otherwise block the
        loop past the grace budget. A call cut by the deadline commits nothing; the runner's
        watchdog does not let the thread hold the exit. Code off the loop that reuses the file
        at once (a CLI, a test) passes `wait_s` so the connection is really closed first: a
        connection closed later still writes (its WAL checkpoint) into whatever the file is
        by then.

        Returns:
            True when the connection is closed by the time this returns.
        """

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._closed:
            return self._shut is not None and self._shut.done()
        self._closed = True
        self._shut = self._executor.submit(shut)
        self._executor.shutdown(wait=False)
        if wait_s > 0:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                self._shut.result(timeout=wait_s)
        return self._shut.done()
