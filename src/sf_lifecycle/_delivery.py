"""Delivering one segment file to a sink: the step a drain and a recovery share.

A file is read in bounded pieces, one batch ahead of the sink (parsing overlaps the sink's
commit, and memory does not grow with the file), its records handed to the sink in batches of
`batch_records`, the delivery listeners (the idempotency index) run after each commit, and only
then is the file removed, or moved to `quarantine/` when it had damage. A sink that raises
`RecordsRejected` committed the rest of the batch: the rejected records are written to
`quarantine/` (their frames and the reason), logged by id (never by content), counted, and the
delivery goes on, so one record the sink can never store cannot block the queue. Nothing is deleted
before the sink has all of it; a deadline stops before a new batch starts and abandons a running
sink call, leaving the file for the next attempt (a redelivery is a no-op: sinks are
idempotent by record id).

`drain_every` is the queue's background drainer: a drain each period while there is work, every
failure (a drain that raised, or a sink that failed and left its file) counted for the ready
body and retried with backoff (the period doubled per consecutive failure, at most
`MAX_BACKOFF_S` or the period), the task never dying of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _crashpoints as _cp
from . import _fs
from ._background import stops_task
from ._errors import RecordsRejected
from ._redact import describe_error, quotes_server_text
from ._segments import NotASegment, Record, SegmentReader, quarantine_file, quarantine_records
from ._statefiles import state_subdir

if TYPE_CHECKING:
    from ._sink import Sink

__all__ = ["Delivery", "DeliveryListener", "DrainResult", "drain_every"]

logger = logging.getLogger("sf_lifecycle.queue")

#: Longest wait of the background drainer between two failed drains.
MAX_BACKOFF_S = 5.0

#: Called after the sink committed a batch, before its file may be unlinked.
DeliveryListener = Callable[[Sequence[Record]], Awaitable[None]]


@dataclass(slots=True)
class DrainResult:
    """What one `drain()` or `recover()` did.

    Attributes:
        delivered: Records the sink committed.
        files_done: Segment files fully delivered and removed (or quarantined).
        files_left: `.draining` files left on disk (deadline reached or the sink failed).
        quarantined: Files moved to quarantine because of corruption.
        rejected: Records the sink refused for good (`RecordsRejected`), set aside in
            quarantine.
        complete: True when nothing this call was responsible for was left behind.
        elapsed_ms: Duration of the call.
        error: Why the sink failed (no path, no secret), when it did.
    """

    delivered: int = 0
    files_done: int = 0
    files_left: int = 0
    quarantined: int = 0
    rejected: int = 0
    complete: bool = True
    elapsed_ms: float = 0.0
    error: str | None = None


class Delivery:
    """Delivers segment files of one queue; counts what it delivered.

    Args:
        state_dir: The state directory (checked for links before each unlink or move).
        batch_records: Records per sink call.
        dir_mode: Mode of the folders it re-creates (quarantine).
    """

    def __init__(self, state_dir: Path, batch_records: int, dir_mode: int) -> None:
        self.state_dir = state_dir
        self.batch_records = batch_records
        self.dir_mode = dir_mode
        self.listeners: list[DeliveryListener] = []
        #: Records handed to the sink since the queue started.
        self.delivered = 0
        #: Sink calls that raised or ran out of time (the file stays and is retried).
        self.sink_errors = 0
        #: Files moved to quarantine since the queue started.
        self.quarantined = 0
        #: Records the sink refused for good (`RecordsRejected`), set aside in quarantine.
        self.rejected = 0

    async def files(
        self, files: list[Path], sink: Sink, deadline: float | None, began: float
    ) -> DrainResult:
        """Deliver `files` in order (a drain, begun at monotonic `began`); stop at the first
        that cannot be finished, leaving it and the rest on disk."""
        result = DrainResult()
        i = 0
        try:
            for i, path in enumerate(files):
                if not await self.file(path, sink, deadline, result):
                    result.complete = False
                    result.files_left = len(files) - i
                    break
        except asyncio.CancelledError:
            logger.warning(
                "drain cancelled after %d record(s); %d file(s) left on disk as .draining",
                result.delivered,
                len(files) - i,
            )
            raise
        result.elapsed_ms = (time.monotonic() - began) * 1000
        if result.delivered or not result.complete:
            logger.info(
                "queue drained %d record(s) in %.0f ms%s",
                result.delivered,
                result.elapsed_ms,
                "" if result.complete else f"; {result.files_left} file(s) left on disk",
            )
        return result

    async def file(
        self,
        path: Path,
        sink: Sink,
        deadline: float | None,
        result: DrainResult,
        on_batch: Callable[[Path, Sequence[Record]], None] | None = None,
    ) -> bool:
        """Deliver `path`; True when it is done (removed or quarantined).

        The file is read in bounded pieces on a worker thread, one batch ahead of the sink: the
        next batch is parsed while the sink stores this one, and no more than two batches and
        one piece of the file are in memory, whatever the file's size. `on_batch(path,
        records)` runs on each batch as it is read, before the sink sees it.
        """
        try:
            reader = await asyncio.to_thread(SegmentReader, path)
        except FileNotFoundError:
            return True  # delivered by someone who held the lock before us
        except NotASegment as exc:
            # Moved aside, never followed or deleted: an operator decides what it was.
            if not await self._set_aside(path, [(0, str(exc))]):
                return False
            result.quarantined += 1
            self.quarantined += 1
            result.files_done += 1
            return True
        except OSError as exc:  # EIO opening: leave the file for the next attempt
            logger.error("cannot read %s (%s); left on disk for the next attempt", path, exc)
            return False
        try:
            if not await self._batches(reader, sink, deadline, result, on_batch):
                return False
        finally:
            reader.close()  # after the batch a worker may still be reading, if any
        if reader.torn_at is not None:
            logger.info(
                "%s: dropped a torn tail of %d byte(s) at offset %d (a write cut by a crash, "
                "never acknowledged)",
                path.name,
                reader.size - reader.torn_at,
                reader.torn_at,
            )
        if _cp.ARMED:
            _cp.hit("drain.before_unlink")
        problems = reader.problems
        if problems:
            if not await self._set_aside(path, problems):
                return False
            result.quarantined += 1
            self.quarantined += 1
        else:
            try:
                state_subdir(self.state_dir, "feedback", self.dir_mode)  # not through a link
                _fs.os.unlink(path)  # no directory fsync: a resurrected file is only redelivered
            except FileNotFoundError:
                pass
            except OSError as exc:  # delivered, but it stays: redelivered (a no-op) next time
                logger.error("cannot remove delivered %s (%s); retried later", path.name, exc)
                return False
        if _cp.ARMED:
            _cp.hit("drain.after_unlink")
        result.files_done += 1
        return True

    async def _batches(
        self,
        reader: SegmentReader,
        sink: Sink,
        deadline: float | None,
        result: DrainResult,
        on_batch: Callable[[Path, Sequence[Record]], None] | None,
    ) -> bool:
        """Every batch of `reader` to the sink, reading the next one meanwhile; False when
        the file must stay (deadline, sink failure, read error)."""
        name = reader.path.name
        step = self.batch_records
        ahead = _read_ahead(reader, step)
        while True:
            try:
                batch = await ahead
            except OSError as exc:  # EIO mid-file: what was delivered is a no-op next time
                logger.error("cannot read %s (%s); left on disk for the next attempt", name, exc)
                return False
            if not batch:
                return True
            if on_batch is not None:
                on_batch(reader.path, batch)
            ahead = _read_ahead(reader, step)  # parsed while the sink stores `batch`
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    stored = await self._store(reader.path, batch, sink, result)
                    if stored is None:
                        return False
                    if _cp.ARMED:
                        _cp.hit("drain.after_sink_commit")
                    for listener in self.listeners:
                        await listener(stored)
            except TimeoutError:
                self.sink_errors += 1
                logger.warning("deadline reached while delivering %s; left on disk", name)
                return False
            except Exception as exc:
                self.sink_errors += 1
                result.error = describe_error(exc)
                if quotes_server_text(exc):  # class and SQLSTATE only: never the record
                    logger.error(
                        "sink failed on %s (%s); the file stays and is retried", name, result.error
                    )
                else:
                    logger.exception("sink failed on %s; the file stays and is retried", name)
                return False
            result.delivered += len(stored)
            self.delivered += len(stored)

    async def _store(
        self, path: Path, batch: list[Record], sink: Sink, result: DrainResult
    ) -> list[Record] | None:
        """`sink(batch)`; the records it committed, or None when the file must stay (the
        rejected records could not be written to quarantine)."""
        try:
            await sink(batch)
        except RecordsRejected as exc:
            ids = set(exc.ids)
            rejected = [r for r in batch if r["id"] in ids]
            if len(rejected) < len(ids):  # a sink's mistake: those ids are not in this batch
                logger.warning(
                    "the sink rejected %d id(s) not in the batch from %s; ignored",
                    len(ids) - len(rejected),
                    path.name,
                )
                if not rejected:
                    return batch
            reason = describe_error(Exception(exc.reason)).partition(": ")[2] or "rejected"
            try:
                target, new = await asyncio.to_thread(
                    quarantine_records, path, rejected, reason, self.state_dir, self.dir_mode
                )
            except OSError as err:
                self.sink_errors += 1
                logger.error(
                    "cannot quarantine %d record(s) the sink rejected from %s (%s); the file "
                    "stays and is retried",
                    len(rejected),
                    path.name,
                    err,
                )
                result.error = f"RecordsRejected: cannot quarantine: {describe_error(err)}"
                return None
            if new:  # a retry of the file finds them set aside already: counted once
                for r in rejected:
                    logger.error(
                        "record %s from %s can never be stored by the sink (%s); set aside in %s",
                        r["id"],
                        path.name,
                        reason,
                        target,
                    )
                result.rejected += len(rejected)
                self.rejected += len(rejected)
            return [r for r in batch if r["id"] not in ids]
        return batch

    async def _set_aside(self, path: Path, problems: list[tuple[int, str]]) -> bool:
        """Quarantine `path`; False (logged, the file left for the next attempt) if that fails."""
        try:
            await asyncio.to_thread(quarantine_file, path, problems, self.state_dir, self.dir_mode)
        except FileNotFoundError:
            return True  # another recoverer moved it first
        except OSError as exc:
            logger.error("cannot quarantine %s (%s); left for the next attempt", path.name, exc)
            return False
        return True


def _read_ahead(reader: SegmentReader, limit: int) -> asyncio.Future[list[Record]]:
    """The next batch of `reader`, read on a worker thread (a bounded queue of one batch).

    A batch nobody awaits any more (the sink failed, the deadline passed) is still read to its
    end; its error, if any, is consumed here rather than reported as never retrieved.
    """
    fut = asyncio.get_running_loop().run_in_executor(None, reader.batch, limit)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


async def drain_every(
    interval_s: float,
    stop: asyncio.Event,
    has_work: Callable[[], bool],
    drain: Callable[[], Awaitable[Any]],
    state: dict[str, Any],
) -> None:
    """Run `drain()` every `interval_s` while `has_work()`, until `stop` is set.

    `state` (the ready body's `drainer`) is updated in place: `{"failures": 0}` after a good
    drain, the failure count and the last error (no path) after a failed one: a drain that
    raised, or whose `DrainResult` carries the sink's `error`. After a failure the next drain
    waits twice as long as the last, at most `max(interval_s, MAX_BACKOFF_S)`.
    """
    wait_s = interval_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait_s)
        if stop.is_set():
            return
        error: BaseException | str | None = None
        try:  # every failure is retried with backoff: this task must never die
            if has_work():
                result = await drain()
                error = getattr(result, "error", None)
        except BaseException as exc:  # a sink's CancelledError or SystemExit: `_background`
            if stops_task(exc):
                raise
            error = exc
        if error is None:
            state.clear()
            state["failures"] = 0
            wait_s = interval_s
            continue
        failures = state.get("failures", 0) + 1
        state.clear()
        described = error if isinstance(error, str) else describe_error(error)
        state.update(failures=failures, last_error=described)
        wait_s = min(wait_s * 2, max(interval_s, MAX_BACKOFF_S))
        if isinstance(error, BaseException):
            logger.error(
                "background drain failed; retrying in %.0f ms", wait_s * 1000, exc_info=error
            )
