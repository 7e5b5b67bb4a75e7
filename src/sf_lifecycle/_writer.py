"""The active segment of one queue and the I/O thread that group-commits appends to it.

Callers hand their frame over and wait; one flush per event-loop iteration (`_kick`) passes
everything pending to a single I/O thread, which writes it, fsyncs the segment (and the
directory when the segment is new) and only then resolves the callers' futures. Frames arriving
during an fsync ride the next one, so N concurrent writers share one fsync, and the event loop
never blocks on the disk. Control calls (the rotation a drain starts with) run on the same
thread, in order with the appends queued before them.

A failed write or fsync abandons the segment: its unacknowledged tail is cut and it is never
written again (after a failed fsync the kernel may have dropped the dirty pages and cleared the
error, so a later fsync of that file proves nothing); the next append opens a new segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _crashpoints as _cp
from . import _fs
from ._errors import DiskWriteError, QueueError
from ._segments import fsync_dir, list_segments, segment_path
from ._statefiles import state_subdir

__all__ = ["SegmentWriter"]

logger = logging.getLogger("sf_lifecycle.queue")

#: A frame to append, or a control call to run, with the future and loop of its caller.
_Item = tuple[bytes | Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


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


def _resolve_all(group: list[_Item], value: Any, exc: BaseException | None) -> None:
    loop = group[0][2]
    if all(g[2] is loop for g in group):
        _resolve(loop, [g[1] for g in group], value, exc)
    else:  # pragma: no cover - one queue used from several loops
        for _, fut, lp in group:
            _resolve(lp, [fut], value, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = _fs.os.write(fd, view)
        if n <= 0:  # a regular file never legitimately writes nothing
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


class SegmentWriter:
    """Appends frames to `<token>.<seq>.log` segments of `directory` on its own I/O thread.

    Args:
        state_dir: The state directory (folders under it are never created through a link).
        directory: `<state_dir>/feedback`.
        token: The owning queue's process token (its lock is already held).
        file_mode: Mode of the segments it creates.
        dir_mode: Mode of `directory` if it has to be created again.
    """

    def __init__(
        self, state_dir: Path, directory: Path, token: str, file_mode: int, dir_mode: int
    ) -> None:
        self.state_dir, self.dir, self.token = state_dir, directory, token
        self.file_mode, self.dir_mode = file_mode, dir_mode
        #: Records acknowledged into the active segment, not yet renamed for a drain.
        self.queued = 0
        self.stopped = False
        self._fd: int | None = None
        self._seq = 0
        self._seg_path: Path | None = None
        self._seg_size = 0
        self._seg_new = False
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Item] = []
        self._batch: list[_Item] = []
        self._kick_scheduled = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sf-queue-io", daemon=True)
        self._thread.start()

    # -- event loop side ---------------------------------------------------------------------
    async def write(self, frame: bytes) -> None:
        """Append `frame`; returns once it (and a new segment's name) is fsynced.

        Raises:
            DiskWriteError: the disk refused the write; the frame was not acknowledged.
            QueueError: the writer stopped before the frame was handed to its thread.
        """
        await self._submit(frame)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the I/O thread, in order with the appends queued before it."""
        return await self._submit(fn)

    def _submit(self, item: bytes | Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch.append((item, fut, loop))  # after the items already waiting: order kept
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return fut

    def _kick(self) -> None:
        """Hand the items of this loop iteration to the I/O thread, in one go.

        Deferred by one `call_soon` so that writers woken together (by the previous group's
        fsync) all join the next group instead of the I/O thread grabbing the first alone.
        """
        self._kick_scheduled = False
        batch, self._batch = self._batch, []
        if self.stopped:  # closed meanwhile: the I/O thread is gone
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(QueueError("the feedback queue closed before this write"))
            return
        with self._cond:
            self._pending.extend(batch)
            self._cond.notify()

    # -- I/O thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        """Group-commit the frames queued since the last fsync.

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
        """Write + fsync one group. Raises OSError; then nothing is acknowledged."""
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
            _fs.os.fsync(fd)
            if self._seg_new:
                # The file's name must survive a crash too, or its fsynced data is unreachable.
                fsync_dir(self.dir)
                self._seg_new = False
        except OSError:
            self._abandon_segment()
            raise
        if _cp.ARMED:
            _cp.hit("append.after_fsync")
        self._seg_size += len(data)
        self.queued += count

    def _open_segment(self) -> None:
        state_subdir(self.state_dir, "feedback", self.dir_mode)  # never create through a link
        self._seq += 1
        path = segment_path(self.dir, self.token, self._seq)
        flags = (
            _fs.os.O_WRONLY | _fs.os.O_CREAT | _fs.os.O_EXCL | _fs.os.O_APPEND | _fs.os.O_CLOEXEC
        )
        self._fd = _fs.os.open(path, flags, self.file_mode)
        self._seg_path, self._seg_size, self._seg_new = path, 0, True
        if _cp.ARMED:
            _cp.hit("append.after_open")

    def _abandon_segment(self) -> None:
        """After a failed write or fsync: cut the unacknowledged tail, never write here again.

        Its acknowledged records are drained like any other segment.
        """
        fd, path, size = self._fd, self._seg_path, self._seg_size
        self._fd, self._seg_path = None, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            _fs.os.ftruncate(fd, size)
        with contextlib.suppress(OSError):
            _fs.os.close(fd)
        if size == 0 and path is not None:
            with contextlib.suppress(OSError):
                _fs.os.unlink(path)

    def rotate(self) -> list[Path]:
        """Rename the active segment and any stray own `.log` to `.draining` (I/O thread).

        Returns every own file a drain must deliver, oldest first. Run it through `call`.
        """
        if self._fd is not None and self._seg_path is not None and self._seg_size > 0:
            _fs.os.close(self._fd)
            self._fd, self._seg_path, self.queued = None, None, 0
        files = list_segments(self.dir).get(self.token, [])
        out = []
        renamed = False
        for _, kind, path in files:
            if kind == "log":
                if path == self._seg_path:
                    continue  # active but empty
                target = path.with_suffix(".draining")
                if _cp.ARMED:
                    _cp.hit("drain.before_rename")
                _fs.os.rename(path, target)
                renamed = True
                path = target
            out.append(path)
        if renamed:
            fsync_dir(self.dir)
            if _cp.ARMED:
                _cp.hit("drain.after_rename")
        return out

    # -- stopping ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish every group already handed over, stop the thread, close the segment.

        An active segment that never received a record is removed.
        """
        self._stop_thread()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                _fs.os.close(self._fd)
            if self._seg_size == 0 and self._seg_path is not None:
                with contextlib.suppress(OSError):
                    _fs.os.unlink(self._seg_path)
            self._fd = None

    def abandon(self) -> None:
        """Stop as SIGKILL would after the last acknowledgement: every file left as it is."""
        self._stop_thread()
        if self._fd is not None:
            _fs.os.close(self._fd)
            self._fd = None

    def skip_segments(self, seq: int) -> None:
        """Number the next segment `seq + 1` (tests of names past six digits)."""
        self._seq = seq

    def _stop_thread(self) -> None:
        self.stopped = True
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
