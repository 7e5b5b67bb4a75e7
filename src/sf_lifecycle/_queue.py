"""The durable feedback queue: crash-safe appends, bounded drains, orphan recovery.

Each `FeedbackQueue` (one per process) appends framed records (`_framing`) to its own segment file
under `<state_dir>/feedback/`, named after a random, time-ordered *process token*; a `.lock` file
of the same token is held with `flock` for the queue's lifetime. The kernel releases it when the
process dies, which is how everyone else learns that the segments of that token are orphans:
never by PID (PIDs repeat across containers) or file age.

This module is the queue as its callers see it: `append` (group commit, `_writer`), `drain`
(rename the active segment to `.draining`, deliver it with `_delivery`, unlink it only after the
sink committed everything), the background drainer, `stats` and `close`. The rest lives in a
module named after it:

- `_ids`: record ids (UUIDv7);
- `_segments`: the on-disk layout (names, listing, reading, locks, quarantine, directory fsync);
- `_writer`: the active segment and the I/O thread that group-commits appends;
- `_delivery`: handing one file to the sink, shared by drain and recovery;
- `_recovery`: orphan recovery at start-up and the periodic sweep;
- `_queue_hooks`: the wiring into a `Lifecycle` (`install`);
- `_fs`: the one `os` seam the fault-injection and power-loss tests replace.

See ARCHITECTURE.md ("Feedback queue") for the on-disk layout and the guarantees G1-G6.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _fs
from ._delivery import Delivery, DeliveryListener, DrainResult, drain_every
from ._errors import BudgetExceeded, NotReady, QueueError
from ._framing import encode
from ._ids import new_record_id
from ._recovery import OrphanRecovery
from ._redact import describe_error
from ._segments import list_segments, lock_path, new_token, quarantine_census, try_lock
from ._statefiles import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, state_subdir
from ._writer import SegmentWriter

if TYPE_CHECKING:
    from ._config import Settings
    from ._lifecycle import Lifecycle
    from ._sink import Sink
    from .idempotency import KeyIndex

__all__ = ["DeliveryListener", "DrainResult", "FeedbackQueue", "QueueStats"]

logger = logging.getLogger("sf_lifecycle.queue")


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counters for `/api/ready` and the CLI.

    Attributes:
        queued: Records acknowledged into this process's active segment, not yet draining.
        draining: This process's `.draining` files waiting for the sink.
        orphaned: Segment files of dead owners found by the last scan and not yet recovered.
        quarantined: Files in the quarantine folder (kept for an operator, never deleted).
        delivered: Records this queue handed to the sink since it started.
    """

    queued: int
    draining: int
    orphaned: int
    quarantined: int
    delivered: int


def _options(settings: Settings | None, *explicit: int | None) -> tuple[int, int, int, int, int]:
    """(batch_records, drain_interval_ms, orphan_sweep_ms, file_mode, dir_mode): each explicit
    argument wins, then `settings`, then the defaults (which are `Settings`' too)."""
    if settings is None:
        fallback = (1_000, 200, 30_000, DEFAULT_FILE_MODE, DEFAULT_DIR_MODE)
    else:
        fallback = (
            settings.drain_batch_records,
            settings.drain_interval_ms,
            settings.orphan_sweep_ms,
            settings.file_mode,
            settings.dir_mode,
        )
    a, b, c, d, e = (f if x is None else x for x, f in zip(explicit, fallback, strict=True))
    return a, b, c, d, e


class FeedbackQueue:
    """A durable, multi-process append-only queue of JSON records in `<state_dir>/feedback/`.

    Args:
        state_dir: The state directory (a volume that survives the container).
        batch_records: Records per sink call when draining (default 1,000).
        drain_interval_ms: Period of the background drainer (`start_drainer`; default 200).
        orphan_sweep_ms: Period of the background recovery of dead peers' files, once start-up
            recovery succeeded (default 30,000).
        settings: Where the arguments left out come from (`drain_batch_records`,
            `drain_interval_ms`, `orphan_sweep_ms`, `file_mode`, `dir_mode`); an argument
            given explicitly wins, as everywhere else.
        file_mode: Mode of the segment and lock files this queue creates (default 0600).
        dir_mode: Mode of the directories this queue creates (state dir, queue, quarantine;
            default 0700).

    Create it before the event loop runs or inside it; use it from one event loop.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        batch_records: int | None = None,
        drain_interval_ms: int | None = None,
        orphan_sweep_ms: int | None = None,
        settings: Settings | None = None,
        file_mode: int | None = None,
        dir_mode: int | None = None,
    ) -> None:
        batch_records, drain_interval_ms, orphan_sweep_ms, file_mode, dir_mode = _options(
            settings, batch_records, drain_interval_ms, orphan_sweep_ms, file_mode, dir_mode
        )
        self.file_mode, self.dir_mode = file_mode, dir_mode
        if batch_records < 1 or drain_interval_ms < 1 or orphan_sweep_ms < 1:
            raise ValueError(
                "batch_records, drain_interval_ms and orphan_sweep_ms must be positive"
            )
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "feedback"
        self.quarantine_dir = self.dir / "quarantine"
        self.batch_records = batch_records
        self.drain_interval_s = drain_interval_ms / 1000
        self.orphan_sweep_s = orphan_sweep_ms / 1000
        self.token = new_token()
        self.sink: Sink | None = None
        #: Keyed writes answered with the id stored earlier (`sf_lifecycle.metrics`).
        self.idempotent_replays = 0
        #: The idempotency index `install` wires beside the queue (`feedback_routes` uses it).
        self.idempotency: KeyIndex | None = None
        # The state directory is the operator's (it may be a link); below it nothing is followed.
        _fs.os.makedirs(self.state_dir, mode=dir_mode, exist_ok=True)
        state_subdir(self.state_dir, "feedback/quarantine", self.dir_mode)  # UnsafePath: refused
        # Our lock before any segment of ours exists: a recoverer that sees a segment of this
        # token and fails to take this lock knows we are alive.
        lock = try_lock(lock_path(self.dir, self.token), self.file_mode)
        if lock is None:  # pragma: no cover - a fresh random token cannot be locked by anyone
            raise QueueError(f"process token {self.token} already locked")
        self._lock = lock
        self._writer = SegmentWriter(
            self.state_dir, self.dir, self.token, self.file_mode, self.dir_mode
        )
        self._delivery = Delivery(self.state_dir, batch_records, self.dir_mode)
        self._recovery = OrphanRecovery(self.dir, self.token, self.file_mode, self._delivery)
        self._drain_lock: asyncio.Lock | None = None
        self._close_callbacks: list[Callable[[], object]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._released = False
        #: Failures of the background drainer since its last good drain, shown in the ready body.
        self.drainer: dict[str, Any] = {"failures": 0}

    # -- append --------------------------------------------------------------------------------
    async def append(
        self,
        record: Mapping[str, Any],
        *,
        meta: Mapping[str, Any] | None = None,
        record_id: str | None = None,
    ) -> str:
        """Store `record` durably and return its id.

        Returns only after the record and (for a new segment) its directory entry are fsynced.

        Args:
            record: A JSON-serialisable mapping (no NaN or infinities).
            meta: Extra envelope fields stored beside the record (the idempotency key).
            record_id: The id to store it under (`new_record_id()` when None): a keyed
                write allocates it before its claim, so a replica that takes the claim over
                stores under the same id and the sink keeps one of the two.

        Raises:
            DiskWriteError: the disk refused the write; the record was not acknowledged.
            QueueError: the queue is closed.
            ValueError: the record is not JSON-serialisable.
        """
        if self._closed:
            raise QueueError("the feedback queue is closed; no more appends are accepted")
        rid = record_id if record_id is not None else new_record_id()
        envelope: dict[str, Any] = {"id": rid, "ts": time.time_ns() // 1_000_000}
        if meta:
            envelope.update(meta)
        envelope["data"] = record
        payload = json.dumps(envelope, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        await self._writer.write(encode(payload.encode()))
        return rid

    # -- drain ---------------------------------------------------------------------------------
    def on_close(self, callback: Callable[[], object]) -> None:
        """Call `callback()` when the queue closes (to close what was opened for it; what it
        returns is ignored)."""
        self._close_callbacks.append(callback)

    def add_delivery_listener(self, listener: DeliveryListener) -> None:
        """Call `listener(batch)` after each sink commit, before the file can be removed."""
        self._delivery.listeners.append(listener)

    async def drain(self, sink: Sink, deadline: float | None = None) -> DrainResult:
        """Deliver everything this process queued so far to `sink`.

        A drain already running finishes first (drains never overlap). Records are delivered in
        batches; each file is removed only once all its records are committed.

        Args:
            sink: Receives batches; must be idempotent by record id.
            deadline: `time.monotonic()` value after which no new batch starts and a running
                sink call is abandoned; what is left stays on disk as `.draining`.
        """
        if self._drain_lock is None:
            self._drain_lock = asyncio.Lock()
        async with self._drain_lock:
            began = time.monotonic()
            # On the I/O thread, after the appends queued before it: the `.draining` set is fixed.
            files: list[Path] = await self._writer.call(self._writer.rotate)
            return await self._delivery.files(files, sink, deadline, began)

    def start_drainer(self, sink: Sink) -> None:
        """Deliver queued records every `drain_interval_ms` in the background."""
        if self._drainer is not None:
            return
        self.sink = sink
        self._stop = asyncio.Event()
        drain = functools.partial(self.drain, sink)
        loop = drain_every(self.drain_interval_s, self._stop, self._has_work, drain, self.drainer)
        self._drainer = asyncio.create_task(loop, name="sf-queue-drainer")

    def _has_work(self) -> bool:
        return bool(self._writer.queued) or self._has_own_files()

    def _has_own_files(self) -> bool:
        return bool(list_segments(self.dir).get(self.token))

    async def stop_drainer(self) -> None:
        """Stop the background drainer; a drain it has in flight finishes first."""
        if self._drainer is None or self._stop is None:
            return
        self._stop.set()
        # Never re-raise what the task died of: the final drain and the release must still run.
        await asyncio.wait({self._drainer})
        self._drainer = None

    # -- recovery (`_recovery`) ----------------------------------------------------------------
    @property
    def recovery(self) -> dict[str, Any]:
        """Progress of start-up recovery (`recover`), shown in the ready body."""
        return self._recovery.state

    @recovery.setter
    def recovery(self, value: dict[str, Any]) -> None:
        self._recovery.state = value

    @property
    def sweep(self) -> dict[str, Any]:
        """Outcome of the last periodic orphan sweep, shown in the ready body."""
        return self._recovery.sweep

    @property
    def recovering(self) -> bool:
        """True until start-up recovery succeeded (keyed writes answer 503 meanwhile)."""
        return self._recovery.awaiting_startup or self.recovery.get("state") in (
            "scanning",
            "running",
        )

    async def recover(self, sink: Sink, deadline: float | None = None) -> DrainResult:
        """Re-drain the segments of dead owners found in the directory (start-up, or on demand).

        Safe to run in several processes at once: each dead owner's files are claimed with a
        non-blocking try-lock, so exactly one process delivers them and none waits. Progress is
        kept in `self.recovery` (the ready body); it never stays "running" after this returns
        or raises. A token whose `.lock` is not a regular file is skipped (named in
        `recovery["skipped"]` and the log); its files stay untouched for an operator.
        """
        return await self._recovery.recover(sink, deadline)

    async def sweep_orphans(self, sink: Sink) -> DrainResult:
        """One periodic sweep: deliver the files of peers that died since the last look.

        Like `recover` (try-locks only: a live owner is never blocked nor touched), but its
        outcome goes to `self.sweep`, not to the start-up `recovery` state.
        """
        return await self._recovery.sweep_once(sink)

    def held_key(self, key: str) -> tuple[str, str] | None:
        """`(body hash, record id)` of `key` in another process's undelivered files, if seen.

        Those are the files recovery found locked by someone else (a live owner or another
        recoverer) or behind a refused lock, and the orphans this process is delivering; once
        a file is gone its keys are in the idempotency index.
        """
        return self._recovery.held_key(key)

    def start_sweeper(self, sink: Sink) -> None:
        """Sweep for orphans every `orphan_sweep_ms`; a failed sweep is retried sooner."""
        if self._sweeper is None and not self._closed:
            loop = self._recovery.sweep_loop(sink, self.orphan_sweep_s, lambda: self._closed)
            self._sweeper = asyncio.create_task(loop, name="sf-queue-sweeper")

    async def stop_sweeper(self) -> None:
        """Stop the periodic sweep; a sweep in flight is cancelled (its files stay on disk)."""
        task, self._sweeper = self._sweeper, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})  # what it died of, if anything, was logged by the loop

    def startup_hook(self, sink: Sink) -> Callable[[], Awaitable[None]]:
        """Hold keyed writes until start-up recovery succeeds; return the work that does it.

        The returned coroutine function (what `install` registers as a start-up hook) starts
        the drainer, recovers, raises `QueueError` while recovery is incomplete (the lifecycle
        retries it with backoff), then starts the periodic sweep. `recovering` is True from
        this call until it succeeded.
        """
        start_drainer = functools.partial(self.start_drainer, sink)
        start_sweeper = functools.partial(self.start_sweeper, sink)
        return self._recovery.startup_hook(sink, start_drainer, start_sweeper)

    # -- stats, wiring, close ------------------------------------------------------------------
    def stats(self) -> QueueStats:
        """Counters from memory and one directory listing (cheap enough for a probe).

        Raises:
            NotReady: the queue directory cannot be listed (the reason names no path).
        """
        try:
            own = list_segments(self.dir).get(self.token, [])
            quarantined = quarantine_census(self.state_dir, records=False)[0]
        except OSError as exc:
            raise NotReady(f"cannot list the queue directory: {describe_error(exc)}") from None
        return QueueStats(
            queued=self._writer.queued,
            draining=sum(1 for _, kind, _ in own if kind == "draining"),
            orphaned=self._recovery.orphaned,
            quarantined=quarantined,
            delivered=self._delivery.delivered,
        )

    def install(self, lifecycle: Lifecycle, sink: Sink | None = None) -> None:
        """Register with `lifecycle`: start-up recovery, the drainer, the sweep, the final drain.

        Also wires the idempotency index beside the queue (`self.idempotency`, in
        `<state_dir>/feedback/`), which `feedback_routes` then uses. Start-up recovery is
        retried with backoff until it succeeds (`/api/ready` is 503 and keyed writes answer 503
        "recovering" meanwhile); then orphans are swept every `orphan_sweep_ms`. The wiring is
        `_queue_hooks.install`.

        Args:
            lifecycle: The application's lifecycle.
            sink: Where records go; a `SqliteSink` at `<state_dir>/feedback.sqlite3` when None.
        """
        from ._queue_hooks import install

        install(self, lifecycle, sink)

    async def close(self, deadline: float | None = None) -> DrainResult | None:
        """Stop the drainer, drain what is left within `deadline`, release the files.

        Raises:
            BudgetExceeded: the deadline came before everything was delivered; the rest stays
                on disk as `.draining` for the next start (or a live peer) to recover.
        """
        if self._closed:
            return None
        await self.stop_sweeper()
        await self.stop_drainer()
        self._closed = True
        result = None
        try:
            if self.sink is not None:
                result = await self.drain(self.sink, deadline)
                if not result.complete:
                    raise BudgetExceeded(
                        f"feedback queue: {result.files_left} file(s) not delivered before the "
                        "deadline; they stay on disk and are recovered at the next start"
                    )
        finally:
            self._release()
        return result

    def _release(self) -> None:
        """Close without draining: stop the I/O thread, drop the lock, run the callbacks."""
        if self._released:
            return
        self._released = True
        self._closed = True
        self._writer.stop()  # it finishes every group already handed to it first
        if not self._has_own_files():
            with contextlib.suppress(FileNotFoundError):
                _fs.os.unlink(self._lock.lock_file)
        self._lock.release()
        for callback in self._close_callbacks:
            try:
                callback()
            except Exception:
                logger.exception("feedback queue close callback %r failed", callback)

    # -- test seams ----------------------------------------------------------------------------
    # Tests of crashes and of long-lived queues use these instead of reaching into the queue's
    # state; nothing in the library calls them.
    def _simulate_crash(self) -> None:
        """Stop as SIGKILL would: every file left as it is, the lock dropped by the "kernel".

        Appends already acknowledged stay in their `.log`; nothing is drained, truncated or
        unlinked, no close callback runs. The queue is closed; another queue on the same state
        directory sees this token's files as orphans.
        """
        self._closed = True
        self._writer.abandon()
        self._lock.release()

    async def _seal_segment(self) -> None:
        """Rename the active segment `.draining` without delivering it (a drain cut short)."""
        await self._writer.call(self._writer.rotate)

    def _start_segments_after(self, seq: int) -> None:
        """Number the next segment `seq + 1`: names past six digits without 55 h of traffic."""
        self._writer.skip_segments(seq)
