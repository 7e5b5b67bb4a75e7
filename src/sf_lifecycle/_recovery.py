"""Orphan recovery: delivering the segments of dead processes, at start-up and periodically.

For every other token with segment files, try its lock without blocking. Winning the lock proves
the owner is dead (the owner takes it before creating any segment and keeps it) and makes this
process the only one delivering those files; losing means a live owner or another recoverer has
them, so they are skipped, and nobody ever waits. The idempotency keys in skipped files are read
and kept in memory until the files are gone (`held_key`), so a keyed retry gets its first id
whoever delivers the record. Recovery runs at start-up (retried until it succeeds; keyed writes
wait for it) and then every `orphan_sweep_ms`, so the files of a peer that dies later are
delivered without a restart. A `.lock` name that is not a regular file is never opened through:
that token is skipped with an error naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _crashpoints as _cp
from . import _fs
from ._background import stops_task
from ._delivery import Delivery, DrainResult
from ._errors import QueueError
from ._redact import describe_error
from ._segments import (
    Flock,
    LockRefused,
    NotASegment,
    Record,
    SegmentReader,
    list_segments,
    lock_path,
    try_lock,
)

if TYPE_CHECKING:
    from ._sink import Sink

__all__ = ["OrphanRecovery"]

logger = logging.getLogger("sf_lifecycle.queue")

#: A token's lock file with no segments left is litter after this long (never an ownership test).
_STALE_LOCK_S = 3600.0
#: First retry delay of a failed background sweep; doubles up to the sweep period.
_RETRY_FIRST_S = 0.2

#: Records decoded at a time while reading the keys of files someone else holds.
_KEY_BATCH = 1_000
#: A file's identity for the held-key cache: (inode, size); a file that grew is read again.
_Sig = tuple[int, int]
#: Idempotency key -> (body hash, record id), as stored in a record's envelope.
_Keys = dict[str, tuple[str, str]]


def _keys_in(records: Sequence[Record]) -> _Keys:
    return {
        r["key"]: (r["sha"], r["id"])
        for r in records
        if isinstance(r.get("key"), str) and isinstance(r.get("sha"), str)
    }


def _read_held(
    directory: Path, token: str, known: Mapping[str, _Sig]
) -> dict[str, tuple[_Sig, _Keys] | None]:
    """The idempotency keys in the files of `token` (worker thread): name -> (sig, keys), or
    None for a file whose sig is in `known` (unchanged, not read again).

    A file that vanishes between the listing and the read was delivered (its keys are in the
    index: listeners run before the unlink) or renamed by its live owner (`.log` to
    `.draining`): the token is listed again so the renamed file is read too.

    Raises:
        OSError: a file could not be read (EIO...): its keys are unknown.
    """
    out: dict[str, tuple[_Sig, _Keys] | None] = {}
    for _ in range(3):
        vanished = False
        for _, _, path in list_segments(directory).get(token, []):
            if path.name in out:
                continue
            try:
                st = _fs.os.stat(path, follow_symlinks=False)
                sig = (st.st_ino, st.st_size)
                if known.get(path.name) == sig:
                    out[path.name] = None
                    continue
                keys: _Keys = {}
                with SegmentReader(path) as reader:  # keys only: memory bounded by a batch
                    while batch := reader.batch(_KEY_BATCH):
                        keys.update(_keys_in(batch))
            except FileNotFoundError:
                vanished = True
                continue
            except NotASegment:
                continue  # holds no record; the deliverer sets it aside
            out[path.name] = (sig, keys)
        if not vanished:
            break
    return out


class OrphanRecovery:
    """Recovery of dead peers' segments for one queue, and the keys of files others hold.

    Args:
        directory: `<state_dir>/feedback`.
        token: The owning queue's token (its own files are never recovered here).
        file_mode: Mode of lock files created while claiming a token.
        delivery: Delivers each claimed file, as a drain does.
    """

    def __init__(self, directory: Path, token: str, file_mode: int, delivery: Delivery) -> None:
        self.dir, self.token, self.file_mode = directory, token, file_mode
        self.delivery = delivery
        #: Progress of start-up recovery, shown in the ready body.
        self.state: dict[str, Any] = {"state": "not started"}
        #: Outcome of the last periodic orphan sweep, shown in the ready body.
        self.sweep: dict[str, Any] = {"runs": 0}
        #: Segment files of dead owners found by the last scan and not yet recovered.
        self.orphaned = 0
        #: Set while a lifecycle waits for start-up recovery (keyed writes answer 503).
        self.awaiting_startup = False
        self._lock: asyncio.Lock | None = None
        self._skips_logged: set[str] = set()
        #: Keys of the records in other tokens' files that this process cannot deliver itself
        #: (a live owner, another recoverer, a refused lock): file name -> (sig, keys). Kept
        #: until the file is gone, i.e. delivered and indexed (see `held_key`).
        self._held: dict[str, tuple[_Sig, _Keys]] = {}
        #: Records of dead peers delivered (start-up recovery and sweeps) since start.
        self.recovered = 0

    async def recover(self, sink: Sink, deadline: float | None = None) -> DrainResult:
        """One recovery whose progress is `state` (it never stays "running" after this)."""
        self.state = {"state": "scanning"}
        try:
            result = await self._run(sink, deadline, self.state)
        except BaseException as exc:
            self.state = {"state": "failed", "error": describe_error(exc)}
            raise
        self.recovered += result.delivered
        return result

    async def sweep_once(self, sink: Sink) -> DrainResult:
        """One periodic sweep whose outcome is `sweep`, not the start-up `state`."""
        progress: dict[str, Any] = {}
        try:
            result = await self._run(sink, None, progress)
        except BaseException as exc:  # a sink's CancelledError or SystemExit included
            self.sweep = {"runs": self.sweep.get("runs", 0) + 1, "state": "failed"}
            self.sweep["error"] = describe_error(exc)
            raise
        self.sweep = {"runs": self.sweep.get("runs", 0) + 1, **progress}
        self.recovered += result.delivered
        return result

    async def sweep_loop(self, sink: Sink, period_s: float, closed: Callable[[], bool]) -> None:
        """Sweep every `period_s` until `closed()`; a failed sweep is retried sooner."""
        delay = period_s
        while not closed():
            await asyncio.sleep(delay)
            if closed():
                return
            try:
                result = await self.sweep_once(sink)
            except BaseException as exc:  # this task must never die: see `_background`
                if stops_task(exc):
                    raise
                result = None
                logger.error("orphan sweep failed (%r); retrying in %.1f s", exc, delay)
            if result is not None and result.complete:
                delay = period_s
            else:  # back off from a short first retry up to the period
                delay = _RETRY_FIRST_S if delay >= period_s else delay * 2
                delay = min(delay, period_s)

    def startup_hook(
        self, sink: Sink, start_drainer: Callable[[], None], start_sweeper: Callable[[], None]
    ) -> Callable[[], Awaitable[None]]:
        """Set `awaiting_startup`; return the start-up work that clears it once it succeeds.

        That work starts the drainer, recovers, raises `QueueError` while recovery is
        incomplete (the sink failed, a lock could not be taken: the lifecycle retries it with
        backoff), then starts the periodic sweep.
        """
        self.awaiting_startup = True

        async def recover_at_startup() -> None:
            start_drainer()
            result = await self.recover(sink)
            if not result.complete:
                raise QueueError(
                    f"start-up recovery incomplete: {result.files_left} file(s) left "
                    f"({result.delivered} record(s) delivered so far)"
                )
            self.awaiting_startup = False
            start_sweeper()

        return recover_at_startup

    def held_key(self, key: str) -> tuple[str, str] | None:
        """`(body hash, record id)` of `key` in another process's undelivered files, if seen."""
        for _, keys in self._held.values():
            found = keys.get(key)
            if found is not None:
                return found
        return None

    async def _run(
        self, sink: Sink, deadline: float | None, progress: dict[str, Any]
    ) -> DrainResult:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # start-up recovery, sweeps and callers never overlap
            began = time.monotonic()
            result = DrainResult()
            tokens = await asyncio.to_thread(list_segments, self.dir)
            present = {p.name for files in tokens.values() for _, _, p in files}
            # A file that is gone was delivered, and its keys indexed, before it was removed.
            self._held = {n: v for n, v in self._held.items() if n in present}
            candidates = {t: f for t, f in tokens.items() if t != self.token and f}
            self.orphaned = sum(len(f) for f in candidates.values())
            done_files = 0
            skipped: list[str] = []
            progress.update(state="running", files_total=self.orphaned, files_done=0)
            for token, listed in sorted(candidates.items()):
                name = f"{token}.lock"
                try:
                    claimed = await asyncio.to_thread(self._claim, token)
                except LockRefused as exc:
                    skipped.append(name)
                    if name not in self._skips_logged:
                        self._skips_logged.add(name)
                        logger.error(
                            "cannot recover %d segment file(s) of %s: its lock %s is %s, not a "
                            "regular file; left untouched (never followed or deleted). Move it "
                            "out of the way and the next sweep delivers them",
                            len(listed),
                            token,
                            self.dir / name,
                            exc,
                        )
                    if not await self._hold_keys(token, result):
                        result.files_left += len(listed)
                    continue
                except OSError as exc:
                    logger.error(
                        "cannot take the lock %s (%s); its %d file(s) are retried later",
                        self.dir / name,
                        exc,
                        len(listed),
                    )
                    result.complete = False
                    result.files_left += len(listed)
                    continue
                if claimed is None:
                    # A live owner, or another recoverer (`queue recover`, a peer's sweep): the
                    # lock cannot tell which. Their keys are honoured from the files meanwhile.
                    self.orphaned -= len(listed)
                    if not await self._hold_keys(token, result):
                        result.files_left += len(listed)
                    continue
                self._skips_logged.discard(name)
                lock, files = claimed
                try:
                    if files:
                        logger.warning(
                            "recovering %d orphaned segment file(s) of dead process %s",
                            len(files),
                            token,
                        )
                    finished = True
                    for path in files:
                        ok = await self.delivery.file(path, sink, deadline, result, self._hold)
                        if not ok:
                            finished = False
                            result.complete = False
                            result.files_left += 1
                            break
                        done_files += 1
                        self.orphaned = max(0, self.orphaned - 1)
                        progress.update(files_done=done_files, records_delivered=result.delivered)
                    if finished:
                        # Data first, then the lock file, then release: a recoverer that takes
                        # the lock after us finds nothing to deliver.
                        if _cp.ARMED:
                            _cp.hit("recover.before_lock_unlink")
                        with contextlib.suppress(OSError):
                            _fs.os.unlink(lock.lock_file)
                finally:
                    lock.release()
                if deadline is not None and not result.complete:
                    break  # out of time: the rest waits for the next attempt
            try:
                await asyncio.to_thread(self._remove_stale_locks, tokens)
            except OSError as exc:  # litter only: never worth failing recovery for
                logger.warning("could not remove stale lock files: %s", exc)
            result.elapsed_ms = (time.monotonic() - began) * 1000
            progress.clear()
            progress.update(
                state="done" if result.complete else "incomplete",
                files_done=done_files,
                records_delivered=result.delivered,
                elapsed_ms=round(result.elapsed_ms, 3),
            )
            if skipped:
                progress["skipped"] = skipped
            if not result.complete:
                progress["files_left"] = result.files_left
            if result.files_done or not result.complete:
                logger.info(
                    "recovery delivered %d record(s) from %d orphaned file(s) in %.0f ms%s",
                    result.delivered,
                    result.files_done,
                    result.elapsed_ms,
                    "" if result.complete else "; the rest is left for the next attempt",
                )
            return result

    def _hold(self, path: Path, records: Sequence[Record]) -> None:
        """An orphan this process delivers: a keyed retry meanwhile gets the id of a record
        read so far (batches are read one ahead of the sink; the file is never held whole)."""
        keys = _keys_in(records)
        held = self._held.get(path.name)
        if held is None:
            self._held[path.name] = ((-1, 0), keys)  # -1: never taken for an unchanged file
        elif keys:
            held[1].update(keys)

    async def _hold_keys(self, token: str, result: DrainResult) -> bool:
        """Remember the idempotency keys in `token`'s files, which someone else holds.

        A keyed retry must find its first record's id even while that record sits in a file
        this process may not deliver: read the keys (a file only grows or goes away) and keep
        them until the file is gone. False (and `result` incomplete) when a file is unreadable.
        """
        known = {name: sig for name, (sig, _) in self._held.items()}
        try:
            found = await asyncio.to_thread(_read_held, self.dir, token, known)
        except OSError as exc:
            logger.error(
                "cannot read the idempotency keys of %s's files (%s); retried later",
                token,
                describe_error(exc),
            )
            result.complete = False
            return False
        for name, value in found.items():
            if value is not None:
                self._held[name] = value
        return True

    def _claim(self, token: str) -> tuple[Flock, list[Path]] | None:
        lock = try_lock(lock_path(self.dir, token), self.file_mode)
        if lock is None:
            return None
        try:
            if _cp.ARMED:
                _cp.hit("recover.after_claim")
            # Re-list under the lock: a recoverer that held it before us may have finished.
            files = [p for _, _, p in list_segments(self.dir).get(token, [])]
        except BaseException:
            lock.release()
            raise
        return lock, files

    def _remove_stale_locks(self, tokens: dict[str, list[tuple[int, str, Path]]]) -> None:
        """Remove lock files of dead tokens that own no segment (litter, not ownership)."""
        now = time.time()
        for token, files in tokens.items():
            if files or token == self.token:
                continue
            path = lock_path(self.dir, token)
            try:
                st = _fs.os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < _STALE_LOCK_S:
                    continue  # not ours to judge (never follow or delete what is not a file)
                lock = try_lock(path)
            except (LockRefused, OSError):
                continue
            if lock is not None:
                with contextlib.suppress(OSError):
                    _fs.os.unlink(path)
                lock.release()
