"""The durable feedback queue: crash-safe appends, bounded drains, orphan recovery.

Each `FeedbackQueue` (one per process) appends framed records (`_framing`) to its own segment file
under `<state_dir>/feedback/`, named after a random, time-ordered *process token*; a `.lock` file
of the same token is held with `flock` (filelock) for the queue's lifetime. The kernel releases it
when the process dies, which is how everyone else learns that the segments of that token are
orphans: never by PID (PIDs repeat across containers) or file age.

Append (group commit): callers queue their frame and wait; one flush task hands everything pending
to a single I/O thread that writes it, fsyncs the segment (and the directory when the segment is
new) and only then resolves the callers' futures. Appends arriving during an fsync ride the next
one, so N concurrent writers share one fsync; the event loop never blocks on the disk.

Drain: rename the active segment to `.draining` (fsync the directory), later appends go to a new
segment; the records are handed to the sink in batches; the file is unlinked only after the sink
committed all of them. Stopped by the deadline, the `.draining` file simply stays for later.

Recovery: for every other token with segment files, try its lock without blocking. Winning the
lock proves the owner is dead (the owner takes it before creating any segment and keeps it), and
makes this process the only one delivering those files; losing means a live owner or another
recoverer has them, so they are skipped, and nobody ever waits. The idempotency keys in skipped
files are read and kept in memory until the files are gone (`held_key`), so a keyed retry gets
its first id whoever delivers the record. Recovery runs at start-up (retried
until it succeeds; keyed writes wait for it) and then every `orphan_sweep_ms`, so the files of a
peer that dies later are delivered without a restart. A `.lock` name that is not a regular file
is never opened through: that token is skipped with an error naming it.

Names never run out: the segment number is printed with at least six digits and read with any
number of digits (ordered numerically); tokens hold a 48-bit millisecond clock.

See ARCHITECTURE.md ("Feedback queue") for the on-disk layout and the guarantees G1-G6.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _crashpoints as _cp
from ._background import stops_task
from ._errors import BudgetExceeded, DiskWriteError, NotReady, QueueError
from ._framing import encode, scan
from ._redact import describe_error
from ._statefiles import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    open_state_dir,
    refuse_link,
    state_subdir,
)

if TYPE_CHECKING:
    from .config import Settings
    from .idempotency import IdempotencyIndex
    from .lifecycle import Lifecycle
    from .sink import Sink

__all__ = [
    "DrainResult",
    "FeedbackQueue",
    "QueueStats",
    "inspect_state_dir",
    "installed_queues",
    "is_record_id",
    "new_record_id",
]

logger = logging.getLogger("sf_lifecycle.queue")

Record = dict[str, Any]
#: Called after the sink committed a batch, before its file may be unlinked.
DeliveryListener = Callable[[Sequence[Record]], Awaitable[None]]

#: Segment numbers are written with at least 6 digits and read with any number (issue 11: a
#: fixed width strands every file past 999,999, ~55 h of steady traffic for one process).
_SEG_RE = re.compile(r"(?P<token>[0-9a-f]{22})\.(?P<seq>[0-9]{6,})\.(?P<kind>log|draining)\Z")
_LOCK_RE = re.compile(r"(?P<token>[0-9a-f]{22})\.lock\Z")
_ID_RE = re.compile(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}\Z")
#: A token's lock file with no segments left is litter after this long (never an ownership test).
_STALE_LOCK_S = 3600.0
#: First retry delay of a failed background sweep; doubles up to the sweep period.
_RETRY_FIRST_S = 0.2
#: Queues registered with a lifecycle (`install`), for `sf-lifecycle queue recover --app`.
_installed: weakref.WeakSet[FeedbackQueue] = weakref.WeakSet()

_id_lock = threading.Lock()
_id_last_ms = 0
_id_seq = 0


def new_record_id() -> str:
    """A UUIDv7 as 32 hex digits: time-ordered (ms, then a per-process counter), 62 random bits."""
    global _id_last_ms, _id_seq
    ms = time.time_ns() // 1_000_000
    with _id_lock:
        if ms <= _id_last_ms:
            ms = _id_last_ms
            _id_seq += 1
            if _id_seq > 0xFFF:
                ms += 1
                _id_seq = 0
        else:
            _id_seq = 0
        _id_last_ms = ms
        seq = _id_seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return f"{(ms << 80) | (7 << 76) | (seq << 64) | (2 << 62) | rand:032x}"


def is_record_id(value: object) -> bool:
    """True for a string in the format `new_record_id` produces."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def _resolve(
    loop: asyncio.AbstractEventLoop,
    futs: list[asyncio.Future[Any]],
    value: Any,
    exc: BaseException | None,
) -> None:
    """Hand results from the I/O thread to the futures' event loop."""

    def done() -> None:
        for fut in futs:
            if fut.done():  # the caller was cancelled; its record may still be stored
                continue
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        loop.call_soon_threadsafe(done)


def _resolve_all(
    group: list[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]],
    value: Any,
    exc: BaseException | None,
) -> None:
    loop = group[0][2]
    if all(g[2] is loop for g in group):
        _resolve(loop, [g[1] for g in group], value, exc)
    else:  # pragma: no cover - one queue used from several loops
        for _, fut, lp in group:
            _resolve(lp, [fut], value, exc)


def _new_token() -> str:
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(5).hex()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a regular file never legitimately writes nothing
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


@dataclass(slots=True)
class DrainResult:
    """What one `drain()` or `recover()` did.

    Attributes:
        delivered: Records the sink committed.
        files_done: Segment files fully delivered and removed (or quarantined).
        files_left: `.draining` files left on disk (deadline reached or the sink failed).
        quarantined: Files moved to quarantine because of corruption.
        complete: True when nothing this call was responsible for was left behind.
        elapsed_ms: Duration of the call.
    """

    delivered: int = 0
    files_done: int = 0
    files_left: int = 0
    quarantined: int = 0
    complete: bool = True
    elapsed_ms: float = 0.0


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


@dataclass(slots=True)
class _Loaded:
    records: list[Record] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    torn_at: int | None = None
    size: int = 0


class _NotASegment(Exception):
    """A directory entry named like a segment that is not a regular file (refused, never read)."""


def _load(path: Path) -> _Loaded:
    """Read and decode a whole segment (worker thread). Never raises for bad content.

    Opened without following a symbolic link and without blocking (a FIFO), then checked to be a
    regular file: anything else in the queue directory is someone else's doing, and reading
    through a link could deliver (then unlink) files outside the state directory.

    Raises:
        _NotASegment: a symbolic link, directory, FIFO or device under a segment's name.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _NotASegment(
                "a symbolic link (refused: the state directory holds no links)"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotASegment("not a regular file")
    with open(fd, "rb") as f:
        data = f.read()
    result = scan(data)
    out = _Loaded(torn_at=result.torn_at, size=result.size)
    out.problems = [(d.offset, d.reason) for d in result.damage]
    loads = json.loads
    valid_id = _ID_RE.match
    append = out.records.append
    for offset, payload in result.records:
        try:
            record = loads(payload)
        except ValueError as exc:
            out.problems.append((offset, f"bad JSON: {exc}"))
            continue
        rid = record.get("id") if type(record) is dict else None
        if type(rid) is not str or valid_id(rid) is None:
            out.problems.append((offset, "record without a valid id"))
            continue
        append(record)
    out.problems.sort()
    return out


def _segments(directory: Path) -> dict[str, list[tuple[int, str, Path]]]:
    """token -> [(seq, kind, path)] sorted by seq; lock-only tokens map to []."""
    out: dict[str, list[tuple[int, str, Path]]] = {}
    try:
        fd = open_state_dir(directory.parent, directory.name, None)  # UnsafePath: a link
    except FileNotFoundError:
        return out
    try:
        names = os.listdir(fd)  # the folder just checked, whatever its name points to now
    finally:
        os.close(fd)
    for name in names:
        m = _SEG_RE.match(name)
        if m is not None:
            out.setdefault(m["token"], []).append((int(m["seq"]), m["kind"], directory / name))
            continue
        m = _LOCK_RE.match(name)
        if m is not None:
            out.setdefault(m["token"], [])
    for files in out.values():
        files.sort()
    return out


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
        for _, _, path in _segments(directory).get(token, []):
            if path.name in out:
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
                sig = (st.st_ino, st.st_size)
                if known.get(path.name) == sig:
                    out[path.name] = None
                    continue
                loaded = _load(path)
            except FileNotFoundError:
                vanished = True
                continue
            except _NotASegment:
                continue  # holds no record; the deliverer sets it aside
            out[path.name] = (sig, _keys_in(loaded.records))
        if not vanished:
            break
    return out


def _count_entries(state_dir: Path, rel: str) -> int:
    """Entries of `<state_dir>/<rel>` (0 when missing), listed without following a link."""
    try:
        fd = open_state_dir(state_dir, rel, None)
    except FileNotFoundError:
        return 0
    try:
        return len(os.listdir(fd))
    finally:
        os.close(fd)


class _LockRefused(Exception):
    """A `.lock` name that is not a regular file: never opened through, its token skipped."""


class _Flock:
    """An exclusive `flock` on an open lock file; the kernel drops it when the process dies."""

    __slots__ = ("fd", "lock_file")

    def __init__(self, lock_file: Path, fd: int) -> None:
        self.lock_file = lock_file
        self.fd: int | None = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock


def _try_lock(path: Path, mode: int = DEFAULT_FILE_MODE) -> _Flock | None:
    """Take `path`'s flock without waiting; None when someone holds it.

    Created when missing; never opened through a link, and anything but a regular file (a
    directory, FIFO, device) is refused before it is opened for real.

    Raises:
        _LockRefused: `path` is a symbolic link, directory or other non-regular file.
        OSError: any other failure (EACCES, EMFILE, EIO...).
    """
    try:
        st_mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st_mode):
            raise _LockRefused(_kind(st_mode))
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _LockRefused("a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise _LockRefused("a directory") from None
        raise
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):  # swapped in between the lstat and the open
            raise _LockRefused(_kind(st_mode))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return _Flock(path, fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "not a regular file"


class FeedbackQueue:
    """A durable, multi-process append-only queue of JSON records in `<state_dir>/feedback/`.

    Args:
        state_dir: The state directory (a volume that survives the container).
        batch_records: Records per sink call when draining.
        drain_interval_ms: Period of the background drainer (`start_drainer`).
        orphan_sweep_ms: Period of the background recovery of dead peers' files, once start-up
            recovery succeeded.
        settings: Takes `batch_records`, `drain_interval_ms`, `orphan_sweep_ms`, `file_mode` and
            `dir_mode` from here when given.
        file_mode: Mode of the segment and lock files this queue creates.
        dir_mode: Mode of the directories this queue creates (state dir, queue, quarantine).

    Create it before the event loop runs or inside it; use it from one event loop.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        batch_records: int = 1_000,
        drain_interval_ms: int = 200,
        orphan_sweep_ms: int = 30_000,
        settings: Settings | None = None,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
    ) -> None:
        if settings is not None:
            batch_records = settings.drain_batch_records
            drain_interval_ms = settings.drain_interval_ms
            orphan_sweep_ms = settings.orphan_sweep_ms
            file_mode, dir_mode = settings.file_mode, settings.dir_mode
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
        self.token = _new_token()
        self.sink: Sink | None = None
        #: The idempotency index `install` wires beside the queue (`feedback_routes` uses it).
        self.idempotency: IdempotencyIndex | None = None
        # The state directory is the operator's (it may be a link); below it nothing is followed.
        os.makedirs(self.state_dir, mode=dir_mode, exist_ok=True)
        state_subdir(self.state_dir, "feedback/quarantine", dir_mode)  # UnsafePath: refused
        # Our lock before any segment of ours exists: a recoverer that sees a segment of this
        # token and fails to take this lock knows we are alive.
        lock = _try_lock(self.dir / f"{self.token}.lock", file_mode)
        if lock is None:  # pragma: no cover - a fresh random token cannot be locked by anyone
            raise QueueError(f"process token {self.token} already locked")
        self._lock = lock
        self._fd: int | None = None
        self._seq = 0
        self._seg_path: Path | None = None
        self._seg_size = 0
        self._seg_new = False
        self._queued = 0
        self._delivered = 0
        self._orphaned = 0
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[tuple[bytes | Callable[[], Any], asyncio.Future[Any], Any]] = []
        self._batch: list[tuple[bytes | Callable[[], Any], asyncio.Future[Any], Any]] = []
        self._kick_scheduled = False
        self._stopping = False
        self._thread = threading.Thread(target=self._writer, name="sf-queue-io", daemon=True)
        self._thread.start()
        self._drain_lock: asyncio.Lock | None = None
        self._listeners: list[DeliveryListener] = []
        self._close_callbacks: list[Callable[[], None]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False
        self._released = False
        #: Progress of start-up recovery, shown in the ready body.
        self.recovery: dict[str, Any] = {"state": "not started"}
        #: Set by `install`: keyed writes wait (503) until start-up recovery has succeeded.
        self._awaiting_recovery = False
        self._recover_lock: asyncio.Lock | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._skips_logged: set[str] = set()
        #: Outcome of the last periodic orphan sweep, shown in the ready body.
        self.sweep: dict[str, Any] = {"runs": 0}
        #: Keys of the records in other tokens' files that this process cannot deliver itself
        #: (a live owner, another recoverer, a refused lock): file name -> (sig, keys). Kept
        #: until the file is gone, i.e. delivered and indexed (see `held_key`).
        self._held: dict[str, tuple[_Sig, _Keys]] = {}
        #: Failures of the background drainer since its last good drain, shown in the ready body.
        self.drainer: dict[str, Any] = {"failures": 0}

    # -- append ----------------------------------------------------------------------------
    async def append(
        self, record: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None
    ) -> str:
        """Store `record` durably and return its id.

        Returns only after the record and (for a new segment) its directory entry are fsynced.

        Args:
            record: A JSON-serialisable mapping (no NaN or infinities).
            meta: Extra envelope fields stored beside the record (the idempotency key).

        Raises:
            DiskWriteError: the disk refused the write; the record was not acknowledged.
            QueueError: the queue is closed.
            ValueError: the record is not JSON-serialisable.
        """
        if self._closed:
            raise QueueError("the feedback queue is closed; no more appends are accepted")
        rid = new_record_id()
        envelope: dict[str, Any] = {"id": rid, "ts": time.time_ns() // 1_000_000}
        if meta:
            envelope.update(meta)
        envelope["data"] = record
        payload = json.dumps(envelope, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch.append((encode(payload.encode()), fut, loop))
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        await fut
        return rid

    def _kick(self) -> None:
        """Hand the appends of this loop iteration to the I/O thread, in one go.

        Deferred by one `call_soon` so that writers woken together (by the previous group's
        fsync) all join the next group instead of the I/O thread grabbing the first alone.
        """
        self._kick_scheduled = False
        batch, self._batch = self._batch, []
        if self._released:  # closed meanwhile: the I/O thread is gone
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(QueueError("the feedback queue closed before this write"))
            return
        with self._cond:
            self._pending.extend(batch)
            self._cond.notify()

    async def _call_io(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the I/O thread, in order with the appends queued before it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch.append((fn, fut, loop))  # after the appends already waiting: order kept
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return await fut

    def _writer(self) -> None:
        """The I/O thread: group-commits the frames queued since the last fsync.

        Every frame queued while an fsync runs goes into the next write + fsync, so N waiting
        writers cost one fsync. Callers are resolved only after the fsync covering their frame
        returned; a control call (rotation) runs alone, between two groups.
        """
        cond = self._cond
        while True:
            with cond:
                while not self._pending:
                    if self._stopping:
                        return
                    cond.wait()
                batch, self._pending = self._pending, []
            i, n = 0, len(batch)
            while i < n:
                item, fut, loop = batch[i]
                if not isinstance(item, bytes):
                    try:
                        value = item()
                    except BaseException as exc:
                        _resolve(loop, [fut], None, exc)
                    else:
                        _resolve(loop, [fut], value, None)
                    i += 1
                    continue
                j = i + 1
                while j < n and isinstance(batch[j][0], bytes):
                    j += 1
                group = batch[i:j]
                data = item if j == i + 1 else b"".join([g[0] for g in group])  # type: ignore[misc]
                try:
                    self._commit(data, j - i)
                except Exception as exc:
                    logger.error("append of %d record(s) failed: %s", j - i, exc)
                    err: Exception = exc
                    if isinstance(exc, OSError):
                        err = DiskWriteError(
                            exc.errno, f"feedback queue write failed: {exc.strerror or exc}"
                        )
                    _resolve_all(group, None, err)
                else:
                    _resolve_all(group, None, None)
                i = j

    def _commit(self, data: bytes, count: int) -> None:
        """Write + fsync one group (I/O thread). Raises OSError; then nothing is acknowledged."""
        if self._fd is None:
            self._open_segment()
        fd = self._fd
        assert fd is not None
        try:
            if _cp.ARMED:
                _cp.hit("append.before_write")
            _write_all(fd, data)
            if _cp.ARMED:
                _cp.hit("append.after_write")
            os.fsync(fd)
            if self._seg_new:
                # The file's name must survive a crash too, or its fsynced data is unreachable.
                _fsync_dir(self.dir)
                self._seg_new = False
        except OSError:
            self._abandon_segment()
            raise
        if _cp.ARMED:
            _cp.hit("append.after_fsync")
        self._seg_size += len(data)
        self._queued += count

    def _open_segment(self) -> None:
        state_subdir(self.state_dir, "feedback", self.dir_mode)  # never create through a link
        self._seq += 1
        path = self.dir / f"{self.token}.{self._seq:06d}.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags, self.file_mode)
        self._seg_path, self._seg_size, self._seg_new = path, 0, True
        if _cp.ARMED:
            _cp.hit("append.after_open")

    def _abandon_segment(self) -> None:
        """After a failed write or fsync: cut the unacknowledged tail, never write here again.

        A failed fsync may have dropped dirty pages while clearing the error, so a later fsync of
        the same file proves nothing: the segment is closed and the next append starts a new one.
        Its acknowledged records are drained like any other segment.
        """
        fd, path, size = self._fd, self._seg_path, self._seg_size
        self._fd, self._seg_path = None, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        with contextlib.suppress(OSError):
            os.close(fd)
        if size == 0 and path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- drain -----------------------------------------------------------------------------
    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when the queue closes (to close what was opened for it)."""
        self._close_callbacks.append(callback)

    def add_delivery_listener(self, listener: DeliveryListener) -> None:
        """Call `listener(batch)` after each sink commit, before the file can be removed."""
        self._listeners.append(listener)

    def _rotate(self) -> list[Path]:
        """Rename the active segment and any stray own `.log` to `.draining` (I/O thread)."""
        if self._fd is not None and self._seg_path is not None and self._seg_size > 0:
            os.close(self._fd)
            self._fd, self._seg_path, self._queued = None, None, 0
        files = _segments(self.dir).get(self.token, [])
        out = []
        renamed = False
        for _, kind, path in files:
            if kind == "log":
                if path == self._seg_path:
                    continue  # active but empty
                target = path.with_suffix(".draining")
                if _cp.ARMED:
                    _cp.hit("drain.before_rename")
                os.rename(path, target)
                renamed = True
                path = target
            out.append(path)
        if renamed:
            _fsync_dir(self.dir)
            if _cp.ARMED:
                _cp.hit("drain.after_rename")
        return out

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
            files: list[Path] = await self._call_io(self._rotate)
            result = DrainResult()
            i = 0
            try:
                for i, path in enumerate(files):
                    if not await self._deliver(path, sink, deadline, result):
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

    async def _deliver(
        self, path: Path, sink: Sink, deadline: float | None, result: DrainResult
    ) -> bool:
        """Deliver one file; True when it is done (removed or quarantined)."""
        try:
            loaded = await asyncio.to_thread(_load, path)
        except FileNotFoundError:
            return True  # delivered by someone who held the lock before us
        except _NotASegment as exc:
            # Moved aside, never followed or deleted: an operator decides what it was.
            if not await self._set_aside(path, [(0, str(exc))]):
                return False
            result.quarantined += 1
            result.files_done += 1
            return True
        except OSError as exc:  # EIO reading: leave the file for the next attempt
            logger.error("cannot read %s (%s); left on disk for the next attempt", path, exc)
            return False
        records = loaded.records
        if not path.name.startswith(self.token):
            # An orphan this process delivers: a keyed retry meanwhile gets the record's id.
            self._held[path.name] = ((-1, loaded.size), _keys_in(records))
        step = self.batch_records
        for start in range(0, len(records), step):
            batch = records[start : start + step]
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await sink(batch)
                    if _cp.ARMED:
                        _cp.hit("drain.after_sink_commit")
                    for listener in self._listeners:
                        await listener(batch)
            except TimeoutError:
                logger.warning("deadline reached while delivering %s; left on disk", path.name)
                return False
            except Exception:
                logger.exception("sink failed on %s; the file stays and is retried", path.name)
                return False
            result.delivered += len(batch)
            self._delivered += len(batch)
        if loaded.torn_at is not None:
            logger.info(
                "%s: dropped a torn tail of %d byte(s) at offset %d (a write cut by a crash, "
                "never acknowledged)",
                path.name,
                loaded.size - loaded.torn_at,
                loaded.torn_at,
            )
        if _cp.ARMED:
            _cp.hit("drain.before_unlink")
        if loaded.problems:
            if not await self._set_aside(path, loaded.problems):
                return False
            result.quarantined += 1
        else:
            try:
                state_subdir(self.state_dir, "feedback", self.dir_mode)  # not through a link
                os.unlink(path)  # no directory fsync: a resurrected file is only redelivered
            except FileNotFoundError:
                pass
            except OSError as exc:  # delivered, but it stays: redelivered (a no-op) next time
                logger.error("cannot remove delivered %s (%s); retried later", path.name, exc)
                return False
        if _cp.ARMED:
            _cp.hit("drain.after_unlink")
        result.files_done += 1
        return True

    async def _set_aside(self, path: Path, problems: list[tuple[int, str]]) -> bool:
        """Quarantine `path`; False (logged, the file left for the next attempt) if that fails."""
        try:
            await asyncio.to_thread(self._quarantine, path, problems)
        except FileNotFoundError:
            return True  # another recoverer moved it first
        except OSError as exc:
            logger.error("cannot quarantine %s (%s); left for the next attempt", path.name, exc)
            return False
        return True

    def _quarantine(self, path: Path, problems: list[tuple[int, str]]) -> None:
        for offset, reason in problems:
            logger.warning("corrupt record in %s at offset %d: %s", path, offset, reason)
        state_subdir(self.state_dir, "feedback/quarantine", self.dir_mode)  # no link, anywhere
        target = self.quarantine_dir / path.name
        n = 0
        while target.exists():
            n += 1
            target = self.quarantine_dir / f"{path.name}.{n}"
        os.rename(path, target)
        _fsync_dir(self.quarantine_dir)
        _fsync_dir(self.dir)
        logger.warning(
            "quarantined %s as %s after delivering its good records (%d problem(s), first at "
            "offset %d: %s)",
            path.name,
            target,
            len(problems),
            problems[0][0],
            problems[0][1],
        )

    # -- recovery --------------------------------------------------------------------------
    async def recover(self, sink: Sink, deadline: float | None = None) -> DrainResult:
        """Re-drain the segments of dead owners found in the directory (start-up, or on demand).

        Safe to run in several processes at once: each dead owner's files are claimed with a
        non-blocking try-lock, so exactly one process delivers them and none waits. Progress is
        kept in `self.recovery` (the ready body); it never stays "running" after this returns
        or raises. A token whose `.lock` is not a regular file is skipped (named in
        `recovery["skipped"]` and the log); its files stay untouched for an operator.
        """
        self.recovery = {"state": "scanning"}
        try:
            result = await self._recover(sink, deadline, self.recovery)
        except BaseException as exc:
            self.recovery = {"state": "failed", "error": describe_error(exc)}
            raise
        return result

    async def _recover(
        self, sink: Sink, deadline: float | None, progress: dict[str, Any]
    ) -> DrainResult:
        if self._recover_lock is None:
            self._recover_lock = asyncio.Lock()
        async with self._recover_lock:  # start-up recovery, sweeps and callers never overlap
            began = time.monotonic()
            result = DrainResult()
            tokens = await asyncio.to_thread(_segments, self.dir)
            present = {p.name for files in tokens.values() for _, _, p in files}
            # A file that is gone was delivered, and its keys indexed, before it was removed.
            self._held = {n: v for n, v in self._held.items() if n in present}
            candidates = {t: f for t, f in tokens.items() if t != self.token and f}
            self._orphaned = sum(len(f) for f in candidates.values())
            done_files = 0
            skipped: list[str] = []
            progress.update(state="running", files_total=self._orphaned, files_done=0)
            for token, listed in sorted(candidates.items()):
                name = f"{token}.lock"
                try:
                    claimed = await asyncio.to_thread(self._claim, token)
                except _LockRefused as exc:
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
                    self._orphaned -= len(listed)
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
                        ok = await self._deliver(path, sink, deadline, result)
                        if not ok:
                            finished = False
                            result.complete = False
                            result.files_left += 1
                            break
                        done_files += 1
                        self._orphaned = max(0, self._orphaned - 1)
                        progress.update(files_done=done_files, records_delivered=result.delivered)
                    if finished:
                        # Data first, then the lock file, then release: a recoverer that takes
                        # the lock after us finds nothing to deliver.
                        if _cp.ARMED:
                            _cp.hit("recover.before_lock_unlink")
                        with contextlib.suppress(OSError):
                            os.unlink(lock.lock_file)
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

    def held_key(self, key: str) -> tuple[str, str] | None:
        """`(body hash, record id)` of `key` in another process's undelivered files, if seen.

        Those are the files recovery found locked by someone else (a live owner or another
        recoverer) or behind a refused lock, and the orphans this process is delivering; once
        a file is gone its keys are in the idempotency index.
        """
        for _, keys in self._held.values():
            found = keys.get(key)
            if found is not None:
                return found
        return None

    def _claim(self, token: str) -> tuple[_Flock, list[Path]] | None:
        lock = _try_lock(self.dir / f"{token}.lock", self.file_mode)
        if lock is None:
            return None
        try:
            if _cp.ARMED:
                _cp.hit("recover.after_claim")
            # Re-list under the lock: a recoverer that held it before us may have finished.
            files = [p for _, _, p in _segments(self.dir).get(token, [])]
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
            path = self.dir / f"{token}.lock"
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < _STALE_LOCK_S:
                    continue  # not ours to judge (never follow or delete what is not a file)
                lock = _try_lock(path)
            except (_LockRefused, OSError):
                continue
            if lock is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                lock.release()

    async def sweep_orphans(self, sink: Sink) -> DrainResult:
        """One periodic sweep: deliver the files of peers that died since the last look.

        Like `recover` (try-locks only: a live owner is never blocked nor touched), but its
        outcome goes to `self.sweep`, not to the start-up `recovery` state.
        """
        progress: dict[str, Any] = {}
        try:
            result = await self._recover(sink, None, progress)
        except BaseException as exc:  # a sink's CancelledError or SystemExit included
            self.sweep = {"runs": self.sweep.get("runs", 0) + 1, "state": "failed"}
            self.sweep["error"] = describe_error(exc)
            raise
        self.sweep = {"runs": self.sweep.get("runs", 0) + 1, **progress}
        return result

    def start_sweeper(self, sink: Sink) -> None:
        """Sweep for orphans every `orphan_sweep_ms`; a failed sweep is retried sooner."""
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.create_task(self._sweep_loop(sink), name="sf-queue-sweeper")

    async def _sweep_loop(self, sink: Sink) -> None:
        delay = self.orphan_sweep_s
        while not self._closed:
            await asyncio.sleep(delay)
            if self._closed:
                return
            try:
                result = await self.sweep_orphans(sink)
            except BaseException as exc:  # this task must never die: see `_background`
                if stops_task(exc):
                    raise
                result = None
                logger.error("orphan sweep failed (%r); retrying in %.1f s", exc, delay)
            if result is not None and result.complete:
                delay = self.orphan_sweep_s
            else:  # back off from a short first retry up to the period
                delay = _RETRY_FIRST_S if delay >= self.orphan_sweep_s else delay * 2
                delay = min(delay, self.orphan_sweep_s)

    async def stop_sweeper(self) -> None:
        """Stop the periodic sweep; a sweep in flight is cancelled (its files stay on disk)."""
        task, self._sweeper = self._sweeper, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})  # what it died of, if anything, was logged by the loop

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> QueueStats:
        """Counters from memory and one directory listing (cheap enough for a probe).

        Raises:
            NotReady: the queue directory cannot be listed (the reason names no path).
        """
        try:
            own = _segments(self.dir).get(self.token, [])
            quarantined = _count_entries(self.state_dir, "feedback/quarantine")
        except OSError as exc:
            raise NotReady(f"cannot list the queue directory: {describe_error(exc)}") from None
        return QueueStats(
            queued=self._queued,
            draining=sum(1 for _, kind, _ in own if kind == "draining"),
            orphaned=self._orphaned,
            quarantined=quarantined,
            delivered=self._delivered,
        )

    @property
    def recovering(self) -> bool:
        """True until start-up recovery succeeded (keyed writes answer 503 meanwhile)."""
        return self._awaiting_recovery or self.recovery.get("state") in ("scanning", "running")

    # -- running under a Lifecycle ---------------------------------------------------------
    def start_drainer(self, sink: Sink) -> None:
        """Deliver queued records every `drain_interval_ms` in the background."""
        if self._drainer is not None:
            return
        self.sink = sink
        self._stop = asyncio.Event()
        self._drainer = asyncio.create_task(self._drain_loop(sink), name="sf-queue-drainer")

    async def _drain_loop(self, sink: Sink) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.drain_interval_s)
            if self._stop.is_set():
                return
            try:  # every failure is retried next period: this task must never die
                if self._queued or self._has_own_files():
                    await self.drain(sink)
            except BaseException as exc:  # a sink's CancelledError or SystemExit: `_background`
                if stops_task(exc):
                    raise
                self.drainer = {
                    "failures": self.drainer["failures"] + 1,
                    "last_error": describe_error(exc),
                }
                logger.error(
                    "background drain failed; retrying in %.0f ms",
                    self.drain_interval_s * 1000,
                    exc_info=exc,
                )
            else:
                self.drainer = {"failures": 0}

    def _has_own_files(self) -> bool:
        return bool(_segments(self.dir).get(self.token))

    async def stop_drainer(self) -> None:
        """Stop the background drainer; a drain it has in flight finishes first."""
        if self._drainer is None or self._stop is None:
            return
        self._stop.set()
        # Never re-raise what the task died of: the final drain and the release must still run.
        await asyncio.wait({self._drainer})
        self._drainer = None

    def install(self, lifecycle: Lifecycle, sink: Sink | None = None) -> None:
        """Register with `lifecycle`: start-up recovery, the drainer, the sweep, the final drain.

        Also wires the idempotency index beside the queue (`self.idempotency`, in
        `<state_dir>/feedback/`), which `feedback_routes` then uses.

        Start-up recovery raises while it is incomplete (the sink failed, a lock could not be
        taken), so the lifecycle retries it with backoff and `/api/ready` stays 503 naming it;
        keyed writes answer 503 "recovering" until it succeeded. Then orphans are swept every
        `orphan_sweep_ms`.

        Args:
            lifecycle: The application's lifecycle.
            sink: Where records go; a `SqliteSink` at `<state_dir>/feedback.sqlite3` when None.
        """
        from .idempotency import IdempotencyIndex
        from .sink import SqliteSink

        if self.idempotency is None:
            # Before recovery: re-delivered keyed orphans record their keys in it.
            self.idempotency = IdempotencyIndex.for_queue(self)

        if sink is None:
            own = SqliteSink(
                self.state_dir / "feedback.sqlite3",
                file_mode=self.file_mode,
                dir_mode=self.dir_mode,
            )
            self.on_close(own.close)
            sink = own
        chosen: Sink = sink
        self.sink = chosen
        self._awaiting_recovery = True
        _installed.add(self)

        async def recover_at_startup() -> None:
            self.start_drainer(chosen)
            result = await self.recover(chosen)
            if not result.complete:
                raise QueueError(
                    f"start-up recovery incomplete: {result.files_left} file(s) left "
                    f"({result.delivered} record(s) delivered so far)"
                )
            self._awaiting_recovery = False
            self.start_sweeper(chosen)

        async def readiness() -> dict[str, Any]:
            return {
                "recovery": dict(self.recovery),
                "sweep": dict(self.sweep),
                "drainer": dict(self.drainer),
                **asdict(self.stats()),
            }

        async def final_drain(deadline: float) -> None:
            await self.close(deadline)

        lifecycle.on_startup("feedback-recovery", recover_at_startup)
        lifecycle.add_readiness_check("feedback-queue", readiness)
        lifecycle.on_shutdown("feedback-drain", final_drain)

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
        if self._released:
            return
        self._released = True
        self._closed = True
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()  # it finishes every group already handed to it first
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            if self._seg_size == 0 and self._seg_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._seg_path)
            self._fd = None
        if not self._has_own_files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock.lock_file)
        self._lock.release()
        for callback in self._close_callbacks:
            try:
                callback()
            except Exception:
                logger.exception("feedback queue close callback %r failed", callback)


def installed_queues(state_dir: str | os.PathLike[str] | None = None) -> list[FeedbackQueue]:
    """The queues `install`ed in this process (on `state_dir` when given), oldest first."""
    found = sorted(_installed, key=lambda q: q.token)
    if state_dir is None:
        return found
    want = Path(state_dir).resolve()
    return [q for q in found if q.state_dir.resolve() == want]


def _probe_lock(path: Path) -> str:
    """`"alive"`, `"dead"` or `"blocked"` for a token's lock, without creating or writing it.

    Read-only (a shared, non-blocking flock on an `O_RDONLY` descriptor): `queue status` works
    on a read-only volume and leaves the state directory as it found it. A missing lock file
    means a dead owner (an owner takes its lock before its first segment and keeps it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "dead"
    except OSError:
        return "blocked"  # a link (ELOOP), or unreadable: recovery could not take it either
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "blocked"
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "alive"
    finally:
        os.close(fd)  # also drops the shared lock
    return "dead"


def inspect_state_dir(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Offline census of a state directory for `sf-lifecycle queue status`.

    Counts records by reading every segment; a token whose lock is free is reported orphaned
    (probed read-only, without waiting). Nothing is created or written, and no link under the
    state directory is followed.

    Raises:
        UnsafePath: `feedback`, `feedback/quarantine` or `feedback.sqlite3` (or its `-wal`,
            `-shm`, `-journal`) is a link or of the wrong type.
        sqlite3.DatabaseError: `feedback.sqlite3` is not a readable database.
    """
    state = Path(state_dir)
    directory = state / "feedback"
    out: dict[str, Any] = {
        "queued": 0,
        "draining": 0,
        "orphaned": 0,
        "quarantined": 0,
        "delivered": None,
        "blocked": 0,
        "files": {"live": 0, "orphaned": 0, "quarantined": 0, "blocked": 0},
        "damaged": 0,
    }
    for token, files in _segments(directory).items():
        if not files:
            continue
        owner = _probe_lock(directory / f"{token}.lock")
        for _, kind, path in files:
            try:
                loaded = _load(path)
            except (OSError, _NotASegment):
                continue
            n = len(loaded.records)
            out["damaged"] += len(loaded.problems)
            if owner == "blocked":
                out["blocked"] += n
                out["files"]["blocked"] += 1
            elif owner == "dead":
                out["orphaned"] += n
                out["files"]["orphaned"] += 1
            else:
                out["queued" if kind == "log" else "draining"] += n
                out["files"]["live"] += 1
    out["quarantined"] = out["files"]["quarantined"] = _count_entries(state, "feedback/quarantine")
    db = state / "feedback.sqlite3"
    for name in (db.name, *(db.name + x for x in ("-wal", "-shm", "-journal"))):
        refuse_link(db.with_name(name))  # never opened through a link (the server refuses too)
    if os.path.lexists(db):
        from .sink import count_records

        out["delivered"] = count_records(db)
    return out
