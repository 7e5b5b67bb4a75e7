"""Session event log: what an SSE stream replays after a reconnect, on any replica.

An `EventLog` has three operations: `append` an event to a session and get its id, `read_after`
an id, and `wait` for something newer. `follow()` builds "replay, then live" on top of those
three, so another backend (Redis Streams: XADD / XRANGE / XREAD BLOCK) plugs in without touching
the SSE layer.

`FileEventLog` keeps one append-only file per session under `<state_dir>/sessions/`, so the new
replica of an upgrade (another process on the same volume) replays what the old one wrote.

Deliberate choices:

* **Ids are `"<epoch>-<seq>"`.** `seq` counts 1, 2, 3... inside one log file; `epoch` is the
  wall-clock millisecond the file was created. Dense sequence numbers make "what was lost"
  exact (`floor - seq` events), and the epoch makes a re-created file (after quarantine, or
  after someone deleted it) distinguishable: an id from another epoch gets an explicit "lost"
  event, never a silent replay from an unrelated position. Ids compare as `(epoch, seq)`.
* **A lock around append, not byte offsets as ids.** The next `seq` is read and the line written
  under a `filelock` lock on `<session>.lock`, so two replicas appending to one session never
  reuse a number. Offsets as ids would avoid the lock, but retention rewrites the file, and the
  offsets would then change meaning; the lock is held for one `write()` (microseconds).
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

File layout (`<state_dir>/sessions/<session>.log`), one JSON object per line::

    {"sf_session_log":1,"epoch":1718000000000,"floor":0}     header: ids <= floor were dropped
    {"seq":1,"ts":1718000000123,"data":{"any":"json"}}
    {"seq":2,"ts":1718000000456,"data":[1,2,3]}
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import filelock

from ._errors import DiskWriteError, InvalidEventId, InvalidSessionId

__all__ = [
    "Event",
    "EventLog",
    "FileEventLog",
    "InvalidEventId",
    "InvalidSessionId",
    "follow",
    "validate_session_id",
]

logger = logging.getLogger("sf_lifecycle.events")

_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ID_RE = re.compile(r"([0-9]{1,18})-([0-9]{1,18})")
_LINE_RE = re.compile(rb'\{"seq":([0-9]{1,18}),"ts":(-?[0-9]{1,18}),"data":')
_HEADER_KEY = "sf_session_log"
#: Kind of the synthetic event that reports a gap.
LOST = "lost"


def validate_session_id(session: str) -> str:
    """Return `session` if it is a safe file name component, else raise `InvalidSessionId`."""
    if not isinstance(session, str) or _SESSION_RE.fullmatch(session) is None:
        raise InvalidSessionId(
            f"invalid session id {session!r}: use 1-128 characters from A-Z a-z 0-9 _ -"
        )
    return session


def parse_event_id(event_id: str) -> tuple[int, int]:
    """`"<epoch>-<seq>"` -> `(epoch, seq)`; raises `InvalidEventId`."""
    m = _ID_RE.fullmatch(event_id) if isinstance(event_id, str) else None
    if m is None:
        raise InvalidEventId(
            f"invalid event id {event_id!r}: expected <epoch>-<seq> as sent in `id:` lines"
        )
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a session.

    Attributes:
        id: `"<epoch>-<seq>"`; None only on a `lost` event for a session with no log at all.
        data_json: The event's data, serialized (sent as-is in the SSE `data:` field).
        ts_ms: Wall-clock milliseconds when it was appended.
        kind: `"message"`, or `"lost"` for the synthetic event that reports a gap.
    """

    id: str | None
    data_json: str
    ts_ms: int
    kind: str = "message"

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)


@runtime_checkable
class EventLog(Protocol):
    """What the SSE layer needs from an event store."""

    async def append(self, session: str, data: Any) -> str:
        """Append `data` (a JSON value) and return the new event's id."""
        ...

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """Retained events after `last_id` (all when None), oldest first.

        A position older than retention, from another epoch or past the end yields a leading
        `lost` event whose id is the position the rest of the list continues from.
        """
        ...

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """Wait until something after `last_id` may be readable; False on timeout."""
        ...


async def follow(
    log: EventLog, session: str, last_id: str | None, *, idle_s: float = 5.0
) -> AsyncIterator[Event]:
    """Replay every retained event after `last_id`, then yield live ones, forever.

    No gap and no duplicate: the cursor advances only past events yielded, and `read_after` is
    always asked from the cursor.
    """
    cursor = last_id
    while True:
        batch = await log.read_after(session, cursor)
        for event in batch:
            yield event
            cursor = event.id
        if not batch:
            await log.wait(session, cursor, idle_s)


# -- the file backend --------------------------------------------------------------------------


@dataclass(slots=True)
class _View:
    """A consistent snapshot of one session file; replaced whole on reload or compaction."""

    epoch: int | None  # None: no file
    floor: int
    seqs: list[int]  # appended to in place (after `events`), so readers bisect safely
    events: list[Event]

    @property
    def head(self) -> int:
        return self.seqs[-1] if self.seqs else self.floor


_EMPTY = _View(None, 0, [], [])


class _Session:
    def __init__(self, name: str, path: Path, lock_path: Path, mode: int = 0o600) -> None:
        self.name = name
        self.path = path
        self.lock = filelock.FileLock(lock_path, mode=mode)
        self.mutex = threading.Lock()  # in-process: refresh and append of this session
        self.alock = asyncio.Lock()  # one refresh at a time per process
        self.view = _EMPTY
        self.loaded = False
        self.consumed = 0  # bytes parsed (end of the last complete line)
        self.sig: tuple[int, int, int] | None = None  # (ino, size, mtime_ns) at last look
        self.changed: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters = 0
        self.last_epoch = 0


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Corrupt(Exception):
    pass


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
        self.dir = Path(state_dir) / "sessions"
        self.dir.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        self.file_mode = file_mode
        self.retention_events = retention_events
        self.retention_ms = retention_ms
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
            DiskWriteError: the disk refused the write; nothing was appended.
        """
        s = self._session(session)
        data_json = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        event_id = await asyncio.to_thread(self._append_sync, s, data_json)
        self._notify(s)
        return event_id

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """See `EventLog.read_after`. Raises `InvalidEventId` for a malformed `last_id`."""
        position = None if last_id is None else parse_event_id(last_id)
        s = self._session(session)
        if self._stale(s):
            async with s.alock:
                if self._stale(s):
                    await asyncio.to_thread(self._refresh_locked, s)
        return self._select(s.view, last_id, position, _now_ms())

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """See `EventLog.wait`: wakes on a local append at once, on another process's within
        about `poll_ms`."""
        position = None if last_id is None else parse_event_id(last_id)
        s = self._session(session)
        event = self._changed(s)
        if self._stale(s) or _has_after(s.view, position):
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
        with s.mutex, s.lock:
            self._refresh_sync(s)
            if s.view.epoch is not None:
                self._rewrite(s, self._floor(s.view, _now_ms()))

    # -- selection (pure, on a snapshot) ---------------------------------------------------
    def _floor(self, view: _View, now_ms: int) -> int:
        """Highest seq a reader can no longer get, counting retention by number and age."""
        floor = max(view.floor, view.head - self.retention_events)
        cutoff = now_ms - self.retention_ms
        events = view.events
        i, n = 0, len(view.seqs)
        while i < n and events[i].ts_ms < cutoff:
            i += 1
        if i:
            floor = max(floor, view.seqs[i - 1])
        return floor

    def _select(
        self, view: _View, last_id: str | None, pos: tuple[int, int] | None, now_ms: int
    ) -> list[Event]:
        if view.epoch is None:
            if pos is None:
                return []
            return [_lost(None, now_ms, "reset", last_id, None)]
        epoch = view.epoch
        floor = self._floor(view, now_ms)
        out: list[Event] = []
        if pos is None:
            seq = view.floor  # a new client: everything retained, with no notice
            if floor > seq:
                seq = floor
        elif pos[0] != epoch:
            out.append(_lost(f"{epoch}-{floor}", now_ms, "reset", last_id, None))
            seq = floor
        else:
            seq = pos[1]
            head = view.head
            if seq > head:
                # The log is behind the client (its tail was lost in a crash without fsync).
                return [_lost(f"{epoch}-{head}", now_ms, "ahead", last_id, None)]
            if seq < floor:
                out.append(_lost(f"{epoch}-{floor}", now_ms, "expired", last_id, floor - seq))
                seq = floor
        n = len(view.seqs)
        start = bisect.bisect_right(view.seqs, seq, 0, n)
        out.extend(view.events[start:n])
        return out

    # -- in-memory bookkeeping -------------------------------------------------------------
    def _session(self, session: str) -> _Session:
        validate_session_id(session)
        with self._guard:
            s = self._sessions.get(session)
            if s is None:
                s = _Session(
                    session,
                    self.dir / f"{session}.log",
                    self.dir / f"{session}.lock",
                    self.file_mode,
                )
                self._sessions[session] = s
                if len(self._sessions) > self.max_cached_sessions:
                    for name in list(self._sessions)[: -self.max_cached_sessions]:
                        if self._sessions[name].waiters == 0:
                            del self._sessions[name]
            else:
                self._sessions.move_to_end(session)
            return s

    def _stale(self, s: _Session) -> bool:
        if not s.loaded:
            return True
        try:
            sig: tuple[int, int, int] | None = _sig(os.stat(s.path))
        except FileNotFoundError:
            sig = None
        except OSError:
            return False  # logged by the refresh that failed; retried when the file changes
        return sig != s.sig

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
    def _refresh_locked(self, s: _Session) -> None:
        with s.mutex:
            self._refresh_sync(s)

    def _refresh_sync(self, s: _Session) -> None:
        """Bring `s.view` up to date with the file. Caller holds `s.mutex`."""
        try:
            st = os.lstat(s.path)
            if stat.S_ISLNK(st.st_mode):  # moved aside, never followed
                self._quarantine(s, "a symbolic link (refused: the state directory holds no links)")
                return
        except FileNotFoundError:
            s.view, s.consumed, s.sig, s.loaded = _EMPTY, 0, None, True
            return
        except OSError as exc:
            logger.error("session %s: cannot stat %s: %s", s.name, s.path, exc)
            s.loaded = True
            return
        sig = _sig(st)
        try:
            if (
                s.loaded
                and s.view.epoch is not None
                and st.st_ino == (s.sig or (0,))[0]
                and st.st_size >= s.consumed
            ):
                self._read_tail(s, sig)
            else:
                self._load(s, sig)
        except _Corrupt as exc:
            self._quarantine(s, str(exc))
        except OSError as exc:
            logger.error("session %s: cannot read %s: %s", s.name, s.path, exc)
            s.sig, s.loaded = sig, True  # do not retry until the file changes

    def _read_tail(self, s: _Session, sig: tuple[int, int, int]) -> None:
        with _open_read(s.path) as f:
            f.seek(s.consumed)
            chunk = f.read()
        view = s.view
        used = _parse_lines(chunk, view, s.path)
        s.consumed += used
        s.sig = sig

    def _load(self, s: _Session, sig: tuple[int, int, int]) -> None:
        with _open_read(s.path) as f:
            st = os.fstat(f.fileno())
            raw = f.read()
        nl = raw.find(b"\n")
        if nl < 0:
            raise _Corrupt("no header line")
        try:
            header = json.loads(raw[:nl])
            epoch, floor = header["epoch"], header["floor"]
            if (
                header.get(_HEADER_KEY) != 1
                or not isinstance(epoch, int)
                or not (isinstance(floor, int) and floor >= 0)
            ):
                raise ValueError("unexpected header fields")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise _Corrupt(f"bad header: {exc}") from None
        view = _View(epoch, floor, [], [])
        used = _parse_lines(raw[nl + 1 :], view, s.path)
        s.view, s.consumed, s.sig, s.loaded = view, nl + 1 + used, _sig(st), True
        s.last_epoch = max(s.last_epoch, epoch)

    def _quarantine(self, s: _Session, reason: str) -> None:
        target = s.path.with_name(f"{s.name}.corrupt-{_now_ms()}")
        try:
            with s.lock:
                os.replace(s.path, target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.error("session %s: corrupt (%s) and cannot quarantine: %s", s.name, reason, exc)
            with contextlib.suppress(OSError):
                s.sig = _sig(os.stat(s.path))
            s.view, s.loaded = _EMPTY, True
            return
        else:
            logger.error(
                "session %s: log corrupt (%s); moved to %s, the session starts a new epoch",
                s.name,
                reason,
                target.name,
            )
        s.view, s.consumed, s.sig, s.loaded = _EMPTY, 0, None, True

    def _append_sync(self, s: _Session, data_json: str) -> str:
        try:
            with s.mutex, s.lock:
                self._refresh_sync(s)
                if s.view.epoch is None:
                    self._create(s)
                elif s.sig is not None and s.sig[1] > s.consumed:
                    # A torn last line: its writer died mid-write (we hold the lock, so nobody
                    # is writing now). Cut it off so this line does not glue onto it.
                    logger.warning(
                        "session %s: truncating %d byte(s) of a torn last line",
                        s.name,
                        s.sig[1] - s.consumed,
                    )
                    os.truncate(s.path, s.consumed)
                view = s.view
                assert view.epoch is not None
                seq, ts = view.head + 1, _now_ms()
                line = f'{{"seq":{seq},"ts":{ts},"data":{data_json}}}\n'.encode()
                fd = os.open(s.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
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
                s.sig = _sig(st)
                if self._needs_compaction(view, ts):
                    self._rewrite(s, self._floor(view, ts))
                return event.id  # type: ignore[return-value]
        except filelock.Timeout as exc:  # pragma: no cover - the lock has no timeout
            raise DiskWriteError(f"session {s.name}: lock timeout: {exc}") from exc
        except OSError as exc:
            raise DiskWriteError(
                exc.errno, f"session {s.name}: append failed: {exc.strerror or exc}"
            ) from exc

    def _needs_compaction(self, view: _View, now_ms: int) -> bool:
        slack = max(1, self.retention_events // 4)
        if len(view.seqs) > self.retention_events + slack:
            return True
        return bool(view.events) and view.events[0].ts_ms < now_ms - self.retention_ms * 5 // 4

    def _create(self, s: _Session) -> None:
        epoch = max(_now_ms(), s.last_epoch + 1)
        self._write_file(s, _View(epoch, 0, [], []))

    def _rewrite(self, s: _Session, floor: int) -> None:
        view = s.view
        assert view.epoch is not None
        start = bisect.bisect_right(view.seqs, floor)
        kept = _View(view.epoch, max(floor, view.floor), view.seqs[start:], view.events[start:])
        self._write_file(s, kept)
        logger.info(
            "session %s: compacted to %d event(s) after %s-%d",
            s.name,
            len(kept.seqs),
            kept.epoch,
            kept.floor,
        )

    def _write_file(self, s: _Session, view: _View) -> None:
        """Write a whole log to a temp file and rename it into place (caller holds the lock)."""
        header = json.dumps(
            {_HEADER_KEY: 1, "epoch": view.epoch, "floor": view.floor}, separators=(",", ":")
        )
        parts = [header.encode(), b"\n"]
        for seq, ev in zip(view.seqs, view.events, strict=True):
            parts.append(f'{{"seq":{seq},"ts":{ev.ts_ms},"data":{ev.data_json}}}\n'.encode())
        blob = b"".join(parts)
        tmp = s.path.with_name(f"{s.name}.log.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a crash's leftover, or a planted link: removed, never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.file_mode)
        try:
            _write_all(fd, blob)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, s.path)  # readers holding the old inode notice the new one and reload
        s.view, s.consumed, s.sig = view, len(blob), _sig(os.stat(s.path))
        s.last_epoch = max(s.last_epoch, view.epoch or 0)


def _open_read(path: Path) -> BinaryIO:
    """Open a session log for reading, never through a symbolic link (ELOOP instead)."""
    return open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _parse_lines(chunk: bytes, view: _View, path: Path) -> int:
    """Parse the complete lines of `chunk` into `view`; return the bytes consumed."""
    end = chunk.rfind(b"\n")
    if end < 0:
        return 0
    epoch = view.epoch
    prev = view.head
    new_events: list[Event] = []
    new_seqs: list[int] = []
    pos = 0
    while pos <= end:
        nl = chunk.index(b"\n", pos)
        m = _LINE_RE.match(chunk, pos)
        if m is None or chunk[nl - 1 : nl] != b"}":
            raise _Corrupt(f"unparseable line at byte {pos} of the new data in {path.name}")
        seq, ts = int(m.group(1)), int(m.group(2))
        if seq <= prev:
            raise _Corrupt(f"sequence {seq} after {prev} in {path.name}")
        try:
            data_json = chunk[m.end() : nl - 1].decode()
            json.loads(data_json)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise _Corrupt(f"bad data for seq {seq}: {exc}") from None
        new_events.append(Event(f"{epoch}-{seq}", data_json, ts))
        new_seqs.append(seq)
        prev = seq
        pos = nl + 1
    # Events before seqs: a reader bisecting `seqs` never indexes past `events`.
    view.events.extend(new_events)
    view.seqs.extend(new_seqs)
    return end + 1


def _has_after(view: _View, pos: tuple[int, int] | None) -> bool:
    if view.epoch is None:
        return False
    if pos is None:
        return bool(view.seqs)
    return pos[0] != view.epoch or view.head != pos[1]


def _lost(
    event_id: str | None, now_ms: int, reason: str, last_id: str | None, count: int | None
) -> Event:
    body = {"reason": reason, "last_event_id": last_id, "resume_after": event_id, "lost": count}
    return Event(event_id, json.dumps(body, separators=(",", ":")), now_ms, LOST)
