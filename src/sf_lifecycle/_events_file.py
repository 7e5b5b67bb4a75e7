"""`FileEventLog`: session events in files under `<state_dir>/sessions/`, shared by replicas.

One append-only file per session, so the new replica of an upgrade (another process on the same
volume) replays what the old one wrote. The protocol, the ids and the follow loop are in
`_events.py`; this is one backend of it.

Deliberate choices:

* **A lock around append, not byte offsets as ids.** The next `seq` is read and the line written
  under an `flock` on `<session>.lock` (the lock `filelock` takes too), so two replicas
  appending to one session never reuse a number. Offsets as ids would avoid the lock, but
  retention rewrites the file, and the offsets would then change meaning; the lock is held for
  one `write()` (microseconds).
* **A file's identity is its header, not its inode.** Compaction writes a new file and
  renames it over the old one, and ext4 often gives the new file an inode number the name had
  before: a reader that tracked `(inode, size)` would read a new file from an old offset. Every
  file written gets a random `gen` in its header; a reader continues from its offset only when
  the header it finds (read on the same descriptor as the new bytes) is the one it parsed, and
  otherwise re-reads the file from the start, which is transparent to streams since ids keep
  their meaning. A stat that looks unchanged is trusted only once the file is older than one
  second (a compaction within one clock tick can match inode, size and mtime); until then the
  header decides. Only a file that fails to parse from its first byte is quarantined, and only
  if its name still refers to the file that was judged.
* **No link is followed under the state directory.** The `sessions` folder is opened one
  component at a time with `O_NOFOLLOW` (see `_statefiles`) for every disk operation, and every
  name is resolved relative to that descriptor: `sessions -> /elsewhere` is refused with
  `UnsafePath` (503 on publish) and nothing is created, renamed or deleted there.
* **Retention is exact for readers, lazy on disk.** A reader sees an event only while it is one
  of the newest `retention_events` and younger than `retention_ms`; asking for an older position
  yields a `lost` event naming how many events were dropped. The file is rewritten (temp file,
  then `os.replace`) when it holds 25 % more than that, so compaction is amortised.
* **Live delivery across processes polls.** A process learns of its own appends at once; it
  learns of another process's appends by `stat()`-ing the files that have waiting streams every
  `poll_ms` (50 ms by default: one `stat` per watched session per tick, however many streams
  watch it). `benchmarks/bench_sse.py` measures the latency; no inotify, so it works on any
  volume type that shows another writer's appends.
* **No fsync by default.** An upgrade is a graceful process swap on one host: the page cache is
  shared, so the new replica sees every byte the old one wrote. Events are notifications, not
  the durable writes the feedback queue protects; `fsync=True` buys power-loss durability.
* **Corruption is quarantined, not fatal.** A file that fails to parse is renamed to
  `<session>.corrupt-<ms>` with an error log; the session starts a new epoch, so a client holding
  an old id receives a `lost` event. A torn last line (a writer killed mid-`write`) is ignored by
  readers and truncated by the next appender, under the lock.

File layout (`<state_dir>/sessions/<session>.log`), one JSON object per line (parsed and
encoded in `_sessionview.py`, with the retention rules: this module is the I/O and the locks)::

    {"sf_session_log":1,"epoch":1718000000000,"floor":0,"gen":"9f2c..."}   ids <= floor dropped
    {"seq":1,"ts":1718000000123,"data":{"any":"json"}}
    {"seq":2,"ts":1718000000456,"data":[1,2,3]}
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ._errors import DiskWriteError, UnsafePath
from ._events import Event, parse_event_id, validate_session_id
from ._sessionview import (
    EMPTY,
    MAX_NUMBER,
    Corrupt,
    Retention,
    View,
    encode_header,
    encode_line,
    has_after,
    parse_header,
    parse_lines,
)
from ._statefiles import open_state_dir, state_subdir

__all__ = ["FileEventLog"]

logger = logging.getLogger("sf_lifecycle.events.file")


# -- in memory --------------------------------------------------------------------------


class _Session:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.log_name = f"{name}.log"
        self.lock_name = f"{name}.lock"
        self.tmp_name = f"{name}.log.tmp"
        self.mutex = threading.Lock()  # in-process: refresh and append of this session
        self.alock = asyncio.Lock()  # one refresh at a time per process
        self.view = EMPTY
        self.loaded = False
        self.consumed = 0  # bytes parsed (end of the last complete line)
        self.header = b""  # header line of the file `view` was read from: its identity
        self.sig: tuple[int, int, int] | None = None  # (ino, size, mtime_ns) at last look
        self.trusted = False  # `sig` is old enough that an equal stat means an unchanged file
        self.lock_fd: int | None = None  # the cross-process lock, held under `mutex`
        self.lock_depth = 0
        self.changed: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters = 0
        self.last_epoch = 0


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class FileEventLog:
    """Session events in files under `<state_dir>/sessions/`, shared by every replica.

    Args:
        state_dir: The state directory (the volume that outlives a replica).
        retention_events: Events per session a reader can still resume from.
        retention_ms: Age after which an event can no longer be resumed from.
        poll_ms: How often files with waiting streams are checked for other processes' appends.
        fsync: fsync each append (and compaction) for power-loss durability.
        max_cached_sessions: Sessions kept parsed in memory when nobody streams them.
        file_mode: Mode of the log and lock files created (no file is opened through a link).
        dir_mode: Mode of the `sessions` folder when it is created.

    Raises:
        UnsafePath: `sessions` under the state directory is a link or not a folder.
    """

    def __init__(
        self,
        state_dir: Path | str,
        retention_events: int = 10_000,
        retention_ms: int = 3_600_000,
        *,
        poll_ms: int = 50,
        fsync: bool = False,
        max_cached_sessions: int = 256,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        if retention_events < 1 or retention_ms < 1 or poll_ms < 1:
            raise ValueError("retention_events, retention_ms and poll_ms must be positive")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        self.dir = state_subdir(self.state_dir, "sessions", dir_mode)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.retention_events = retention_events
        self.retention_ms = retention_ms
        self.retention = Retention(retention_events, retention_ms)
        self.poll_s = poll_ms / 1000
        self.fsync = fsync
        self.max_cached_sessions = max_cached_sessions
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._guard = threading.Lock()
        self._poller: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> FileEventLog:
        """Build from `Settings` (state dir and the two `sse_retention_*` settings)."""
        return cls(
            settings.require_state_dir(),
            settings.sse_retention_events,
            settings.sse_retention_ms,
            **{"file_mode": settings.file_mode, "dir_mode": settings.dir_mode, **kwargs},
        )

    # -- public API ----------------------------------------------------------------------
    async def append(self, session: str, data: Any) -> str:
        """Append a JSON value to `session`; returns its id once written.

        Raises:
            InvalidSessionId: the session id cannot name a file.
            ValueError, TypeError: `data` is not JSON (NaN and Infinity included).
            UnsafePath: `sessions` (or the session's file) is a link or of the wrong type;
                nothing was written anywhere.
            DiskWriteError: the disk refused the write; nothing was appended.
        """
        s = self._session(session)
        data_json = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        event_id = await asyncio.to_thread(self._append_sync, s, data_json)
        self._notify(s)
        return event_id

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """See `EventLog.read_after`. Raises `InvalidEventId` for a malformed `last_id`, and
        `UnsafePath` when `sessions` is a link or not a folder."""
        position = None if last_id is None else parse_event_id(last_id)
        s = self._session(session)
        if self._stale(s):
            async with s.alock:
                if self._stale(s):
                    try:
                        await asyncio.to_thread(self._refresh_locked, s)
                    except UnsafePath:
                        raise
                    except OSError as exc:  # a stream must not die: serve what is known
                        logger.error("session %s: cannot refresh: %s", s.name, exc)
        return self.retention.select(s.view, last_id, position, _now_ms())

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """See `EventLog.wait`: wakes on a local append at once, on another process's within
        about `poll_ms`."""
        position = None if last_id is None else parse_event_id(last_id)
        s = self._session(session)
        event = self._changed(s)
        if self._stale(s) or has_after(s.view, position):
            return True
        s.waiters += 1
        self._ensure_poller()
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        finally:
            s.waiters -= 1
        return True

    async def aclose(self) -> None:
        """Stop the background poller (streams still waiting fall back to their timeouts)."""
        task, self._poller = self._poller, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def compact(self, session: str) -> None:
        """Drop what retention allows from one session file now (normally done on append)."""
        s = self._session(session)
        with s.mutex, self._open_dir() as dfd, self._locked(s, dfd):
            self._refresh_sync(s, dfd)
            if s.view.epoch is not None:
                self._rewrite(s, dfd, self.retention.floor(s.view, _now_ms()))

    # -- in-memory bookkeeping -------------------------------------------------------------
    def _session(self, session: str) -> _Session:
        validate_session_id(session)
        with self._guard:
            s = self._sessions.get(session)
            if s is None:
                s = _Session(session, self.dir / f"{session}.log")
                self._sessions[session] = s
                if len(self._sessions) > self.max_cached_sessions:
                    for name in list(self._sessions)[: -self.max_cached_sessions]:
                        if self._sessions[name].waiters == 0:
                            del self._sessions[name]
            else:
                self._sessions.move_to_end(session)
            return s

    def _stale(self, s: _Session) -> bool:
        """Whether the file may differ from `s.view` (event loop: one `stat`, rarely a read)."""
        if not s.loaded:
            return True
        try:
            st = os.stat(s.path, follow_symlinks=False)
        except FileNotFoundError:
            return s.sig is not None
        except OSError:
            return False  # logged by the refresh that failed; retried when the file changes
        if _sig(st) != s.sig:
            return True
        if s.trusted:
            return False
        # Inode, size and mtime can all match a different file: another replica's compaction
        # can get the same inode number back, within one tick of the file-system clock. Until
        # the file is older than that, its header (which names the incarnation) decides.
        try:
            with self._open_dir(create=False) as dfd:
                fd = os.open(s.log_name, _READ_FLAGS, dir_fd=dfd)
                try:
                    same = _sig(os.fstat(fd)) == s.sig and _pread(fd, len(s.header), 0) == s.header
                finally:
                    os.close(fd)
        except OSError:
            return True
        if same and time.time_ns() - st.st_mtime_ns > _RACY_NS:
            s.trusted = True
        return not same

    def _changed(self, s: _Session) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if s.changed is None or s.loop is not loop:
            s.changed, s.loop = asyncio.Event(), loop
        return s.changed

    def _notify(self, s: _Session) -> None:
        event = s.changed
        if event is not None and s.loop is asyncio.get_running_loop():
            s.changed = asyncio.Event()
            event.set()

    def _ensure_poller(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._poller
        if task is None or task.done() or task.get_loop() is not loop:
            self._poller = loop.create_task(self._poll(), name="sf-events-poller")

    async def _poll(self) -> None:
        """Wake waiters of files another process changed. Exits when nobody waits."""
        idle = 0
        while idle < 20:
            await asyncio.sleep(self.poll_s)
            watched = [s for s in list(self._sessions.values()) if s.waiters > 0]
            idle = 0 if watched else idle + 1
            for s in watched:
                if self._stale(s):
                    self._notify(s)

    # -- disk (worker threads) -------------------------------------------------------------
    @contextlib.contextmanager
    def _open_dir(self, *, create: bool = True) -> Iterator[int]:
        """The `sessions` folder, opened without following a link at any step (see
        `_statefiles`): every name below is resolved relative to it."""
        fd = open_state_dir(self.state_dir, "sessions", self.dir_mode if create else None)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, s: _Session, dfd: int) -> Iterator[None]:
        """The cross-process lock of a session (`flock` on `<session>.lock`, the lock the
        `filelock` package takes too). Re-entrant; the caller holds `s.mutex`."""
        if s.lock_depth == 0:
            for _ in range(3):
                fd = self._open_regular(s.lock_name, _LOCK_FLAGS, dfd)
                if fd is not None:
                    break
            else:
                raise UnsafePath(
                    errno.EINVAL, f"'sessions/{s.lock_name}' keeps changing; not a regular file"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            s.lock_fd = fd
        s.lock_depth += 1
        try:
            yield
        finally:
            s.lock_depth -= 1
            if s.lock_depth == 0 and s.lock_fd is not None:
                fd, s.lock_fd = s.lock_fd, None
                os.close(fd)  # releases the flock

    def _open_regular(self, name: str, flags: int, dfd: int) -> int | None:
        """Open `name` (created when `flags` say so) if it is a regular file; anything else
        under that name (a link, folder, socket, FIFO, device) is moved aside and None is
        returned, for the caller to try again."""
        try:
            fd = os.open(name, flags, self.file_mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV):
                raise
            _set_aside(dfd, name, None)
            return None
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(st.st_mode):
            return fd
        try:
            _set_aside(dfd, name, st)  # still open: its inode cannot be reused meanwhile
        finally:
            os.close(fd)
        return None

    def _refresh_locked(self, s: _Session) -> None:
        with s.mutex, self._open_dir() as dfd:
            self._refresh_sync(s, dfd)

    def _refresh_sync(self, s: _Session, dfd: int) -> None:
        """Bring `s.view` up to date with the file. Caller holds `s.mutex`.

        Everything is judged on one open descriptor, so on one incarnation of the file whatever
        another replica renames meanwhile. Only a file that fails to parse from its first byte
        is quarantined, and only if its name still refers to it.
        """
        for _ in range(3):
            try:
                fd = os.open(s.log_name, _READ_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                s.view, s.consumed, s.sig, s.header, s.loaded = EMPTY, 0, None, b"", True
                return
            except OSError as exc:
                # A link (ELOOP), a socket (ENXIO), a device: moved aside, never followed.
                try:
                    judged = os.stat(s.log_name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(judged.st_mode):
                    logger.error("session %s: cannot open %s: %s", s.name, s.path, exc)
                    s.loaded = True
                    return
                if self._quarantine(s, dfd, judged, _kind(judged.st_mode)):
                    return
                continue
            try:
                # fstat before any read: a folder opens fine and fails only when read.
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    reason = _kind(st.st_mode)
                else:
                    try:
                        with open(fd, "rb", closefd=False) as f:
                            self._read(s, f, st)
                        return
                    except Corrupt as exc:
                        reason = str(exc)
                    except OSError as exc:
                        logger.error("session %s: cannot read %s: %s", s.name, s.path, exc)
                        s.sig, s.loaded = _sig(st), True  # not retried until the file changes
                        return
                # Still open here, so its inode number cannot be reused before the comparison.
                if self._quarantine(s, dfd, st, reason):
                    return
            finally:
                os.close(fd)
        logger.error("session %s: %s keeps changing under the reader", s.name, s.path)
        s.loaded = True

    def _read(self, s: _Session, f: BinaryIO, st: os.stat_result) -> None:
        """Read what is new in the open file `f`; the whole file unless it is the incarnation
        `s.view` came from (same header line, not shorter than what was parsed)."""
        view = s.view
        fd = f.fileno()
        if (
            s.loaded
            and view.epoch is not None
            and s.header
            and st.st_size >= s.consumed
            and _pread(fd, len(s.header), 0) == s.header
        ):
            f.seek(s.consumed)
            chunk = f.read()
            try:
                used = parse_lines(chunk, view, s.path)
            except Corrupt as exc:
                # Never a reason to call a file corrupt: it is judged from its first byte.
                logger.warning(
                    "session %s: unexpected data after byte %d (%s); re-reading the file",
                    s.name,
                    s.consumed,
                    exc,
                )
            else:
                s.consumed += used
                self._seen(s, st)
                return
        self._load(s, f, st)

    def _load(self, s: _Session, f: BinaryIO, st: os.stat_result) -> None:
        f.seek(0)
        raw = f.read()
        nl = raw.find(b"\n")
        if nl < 0:
            raise Corrupt("no header line")
        epoch, floor = parse_header(raw[:nl])
        view = View(epoch, floor, [], [])
        used = parse_lines(raw[nl + 1 :], view, s.path)
        s.view, s.consumed, s.header, s.loaded = view, nl + 1 + used, raw[: nl + 1], True
        self._seen(s, st)
        s.last_epoch = max(s.last_epoch, epoch)

    @staticmethod
    def _seen(s: _Session, st: os.stat_result) -> None:
        """Record the stat `s.view` matches (taken before reading, so growth shows later)."""
        s.sig = _sig(st)
        s.trusted = time.time_ns() - st.st_mtime_ns > _RACY_NS

    def _quarantine(
        self, s: _Session, dfd: int, judged: os.stat_result | None, reason: str
    ) -> bool:
        """Move the log aside if its name still refers to `judged` (the file found corrupt);
        False when the name now refers to another file (to be read instead)."""
        with self._locked(s, dfd):
            try:
                now = os.stat(s.log_name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                s.view, s.consumed, s.sig, s.header, s.loaded = EMPTY, 0, None, b"", True
                return True
            if judged is not None and (now.st_dev, now.st_ino) != (judged.st_dev, judged.st_ino):
                return False
            target = f"{s.name}.corrupt-{_now_ms()}"
            n = 0
            while _exists(target, dfd):
                n += 1
                target = f"{s.name}.corrupt-{_now_ms()}.{n}"
            try:
                os.rename(s.log_name, target, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as exc:
                logger.error(
                    "session %s: corrupt (%s) and cannot quarantine: %s", s.name, reason, exc
                )
                s.sig, s.header, s.view, s.loaded = _sig(now), b"", EMPTY, True
                return True
        logger.error(
            "session %s: log corrupt (%s); moved to %s, the session starts a new epoch",
            s.name,
            reason,
            target,
        )
        s.view, s.consumed, s.sig, s.header, s.loaded = EMPTY, 0, None, b"", True
        return True

    def _append_sync(self, s: _Session, data_json: str) -> str:
        try:
            with s.mutex, self._open_dir() as dfd, self._locked(s, dfd):
                self._refresh_sync(s, dfd)
                if s.view.epoch is None:
                    self._create(s, dfd)
                elif s.view.head >= MAX_NUMBER:  # 10**18 events: ids stay 18 digits wide
                    logger.warning("session %s: sequence exhausted; new epoch", s.name)
                    self._write_file(s, dfd, View(self._new_epoch(s), 0, [], []), create=False)
                elif s.sig is not None and s.sig[1] > s.consumed:
                    # A torn last line: its writer died mid-write (we hold the lock, so nobody
                    # is writing now). Cut it off so this line does not glue onto it.
                    logger.warning(
                        "session %s: truncating %d byte(s) of a torn last line",
                        s.name,
                        s.sig[1] - s.consumed,
                    )
                    fd = os.open(s.log_name, os.O_WRONLY | _NOFOLLOW, dir_fd=dfd)
                    try:
                        os.ftruncate(fd, s.consumed)
                    finally:
                        os.close(fd)
                view = s.view
                assert view.epoch is not None
                seq, ts = view.head + 1, _now_ms()
                line = encode_line(seq, ts, data_json)
                fd = os.open(s.log_name, os.O_WRONLY | os.O_APPEND | _NOFOLLOW, dir_fd=dfd)
                try:
                    _write_all(fd, line)
                    if self.fsync:
                        os.fsync(fd)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                event = Event(f"{view.epoch}-{seq}", data_json, ts)
                view.events.append(event)
                view.seqs.append(seq)
                s.consumed += len(line)
                self._seen(s, st)
                if self.retention.needs_compaction(view, ts):
                    try:
                        self._rewrite(s, dfd, self.retention.floor(view, ts))
                    except OSError as exc:  # the event is stored: say so, retry next time
                        logger.error("session %s: compaction failed: %s", s.name, exc)
                return event.id  # type: ignore[return-value]
        except UnsafePath:
            raise
        except OSError as exc:
            raise DiskWriteError(
                exc.errno, f"session {s.name}: append failed: {exc.strerror or exc}"
            ) from exc

    def _new_epoch(self, s: _Session) -> int:
        epoch = max(_now_ms(), s.last_epoch + 1)
        # An epoch at the id width (a clock far in the future once): ids stay parseable, and
        # a client holding an old id still gets its `reset` (epochs are compared for equality).
        return epoch if epoch <= MAX_NUMBER else _now_ms()

    def _create(self, s: _Session, dfd: int) -> None:
        self._write_file(s, dfd, View(self._new_epoch(s), 0, [], []), create=True)

    def _rewrite(self, s: _Session, dfd: int, floor: int) -> None:
        view = s.view
        assert view.epoch is not None
        start = bisect.bisect_right(view.seqs, floor)
        kept = View(view.epoch, max(floor, view.floor), view.seqs[start:], view.events[start:])
        self._write_file(s, dfd, kept, create=False)
        logger.info(
            "session %s: compacted to %d event(s) after %s-%d",
            s.name,
            len(kept.seqs),
            kept.epoch,
            kept.floor,
        )

    def _write_file(self, s: _Session, dfd: int, view: View, *, create: bool) -> None:
        """Write a whole log to a temp file and rename it into place (caller holds the lock).

        The header carries a fresh random `gen`: it is what tells a reader that the file under
        the name is another incarnation, whatever inode number the file system handed out.
        `create` never replaces an existing file (a corrupt one that could not be moved aside).
        """
        header = encode_header(view)
        parts = [header, b"\n"]
        for seq, ev in zip(view.seqs, view.events, strict=True):
            parts.append(encode_line(seq, ev.ts_ms, ev.data_json))
        blob = b"".join(parts)
        try:
            leftover = os.stat(s.tmp_name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISREG(leftover.st_mode):
                os.unlink(s.tmp_name, dir_fd=dfd)  # a crash's leftover (we hold the lock)
            else:
                _set_aside(dfd, s.tmp_name, leftover)  # planted: moved aside, never deleted
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        fd = os.open(s.tmp_name, flags, self.file_mode, dir_fd=dfd)
        try:
            _write_all(fd, blob)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if create:
            os.link(s.tmp_name, s.log_name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            os.unlink(s.tmp_name, dir_fd=dfd)
        else:
            os.replace(s.tmp_name, s.log_name, src_dir_fd=dfd, dst_dir_fd=dfd)
        if self.fsync:
            os.fsync(dfd)
        st = os.stat(s.log_name, dir_fd=dfd, follow_symlinks=False)
        s.view, s.consumed, s.header = view, len(blob), header + b"\n"
        self._seen(s, st)
        s.last_epoch = max(s.last_epoch, view.epoch or 0)


_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Within this of a file's mtime, an unchanged stat does not prove an unchanged file (a
#: file-system clock ticks every few ms; a peer on another host may be a little off).
_RACY_NS = 1_000_000_000


def _pread(fd: int, n: int, offset: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return out


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link (refused: the state directory holds no links)"
    if stat.S_ISDIR(mode):
        return "a folder, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISFIFO(mode):
        return "a FIFO, not a regular file"
    return "not a regular file"


def _set_aside(dfd: int, name: str, judged: os.stat_result | None) -> None:
    """Rename a non-regular entry `name` to `<name>.corrupt-<ms>`: never followed, never
    deleted (an operator decides what it was). Only while the name still refers to `judged`
    (when given) and is not a regular file; gone already is fine."""
    try:
        now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(now.st_mode):
        return  # replaced by a good file meanwhile
    if judged is not None and (now.st_dev, now.st_ino) != (judged.st_dev, judged.st_ino):
        return
    target = f"{name}.corrupt-{_now_ms()}"
    n = 0
    while _exists(target, dfd):
        n += 1
        target = f"{name}.corrupt-{_now_ms()}.{n}"
    try:
        os.rename(name, target, src_dir_fd=dfd, dst_dir_fd=dfd)
    except FileNotFoundError:
        return
    logger.error("sessions/%s is %s; moved aside to sessions/%s", name, _kind(now.st_mode), target)


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
