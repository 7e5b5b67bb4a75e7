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
* **One watcher per session per process.** Every stream of a session in this process shares
  one `SessionWatch` (`_sessionwatch.py`): it learns of another process's appends from inotify
  on the `sessions` folder (a `stat` every `poll_ms` where inotify is missing, or with
  `watch="poll"`), reads what is new once, and wakes the streams, which take their events from
  the parsed view in memory by their own position. A process learns of its own appends at once.
  inotify sees only writes made through this kernel: for a volume shared across hosts (NFS),
  use `watch="poll"` (`SF_SSE_WATCH=poll`), or accept the watch's one-second safety recheck.
* **No fsync by default.** An upgrade is a graceful process swap on one host: the page cache is
  shared, so the new replica sees every byte the old one wrote. Events are notifications, not
  the durable writes the feedback queue protects; `fsync=True` buys power-loss durability.
* **Corruption is quarantined, not fatal.** A file that fails to parse is renamed to
  `<session>.corrupt-<ms>` with an error log; the session starts a new epoch, so a client holding
  an old id receives a `lost` event. A torn last line (a writer killed mid-`write`) is ignored by
  readers and truncated by the next appender, under the lock.

Three modules below this one: `_sessiondisk.py` reads and appends the files (on worker
threads), `_sessionfile.py` holds one session's record, its lock, its rewrite (compaction) and
quarantine, `_sessionview.py` the line format and the retention rules as pure data,
`_sessionwatch.py` the watchers; this module is the API and the cache of sessions.

File layout (`<state_dir>/sessions/<session>.log`), one JSON object per line::

    {"sf_session_log":1,"epoch":1718000000000,"floor":0,"gen":"9f2c..."}   ids <= floor dropped
    {"seq":1,"ts":1718000000123,"data":{"any":"json"}}
    {"seq":2,"ts":1718000000456,"data":[1,2,3]}
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
from pathlib import Path
from typing import Any

from ._errors import ConfigError, UnsafePath
from ._events import Event, parse_event_id, validate_session_id
from ._inotify import Inotify
from ._sessiondisk import SessionDisk
from ._sessionfile import Session, now_ms
from ._sessionview import Retention, has_after
from ._sessionwatch import WATCH_MODES, SessionWatch, Waiter, Watchers
from ._statefiles import state_subdir

__all__ = ["FileEventLog", "FileSubscription"]

logger = logging.getLogger("sf_lifecycle.events.file")


class FileEventLog:
    """Session events in files under `<state_dir>/sessions/`, shared by every replica.

    Args:
        state_dir: The state directory (the volume that outlives a replica).
        retention_events: Events per session a reader can still resume from.
        retention_ms: Age after which an event can no longer be resumed from.
        poll_ms: How often a watched session's file is checked when inotify is not used.
        watch: How other processes' appends are seen: `auto` (inotify where available, else
            polling), `inotify` (`OSError` here if it cannot be used) or `poll`.
        fsync: fsync each append (and compaction) for power-loss durability.
        max_cached_sessions: Sessions kept parsed in memory when nobody streams them.
        file_mode: Mode of the log and lock files created (no file is opened through a link).
        dir_mode: Mode of the `sessions` folder when it is created.

    Raises:
        UnsafePath: `sessions` under the state directory is a link or not a folder.
        ValueError: a setting out of range, or an unknown `watch`.
        OSError: `watch="inotify"` and inotify cannot be used here.
    """

    def __init__(
        self,
        state_dir: Path | str,
        retention_events: int = 10_000,
        retention_ms: int = 3_600_000,
        *,
        poll_ms: int = 50,
        watch: str = "auto",
        fsync: bool = False,
        max_cached_sessions: int = 256,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        if retention_events < 1 or retention_ms < 1 or poll_ms < 1:
            raise ValueError("retention_events, retention_ms and poll_ms must be positive")
        if watch not in WATCH_MODES:
            raise ValueError(f"watch must be one of {', '.join(WATCH_MODES)}, not {watch!r}")
        if watch == "inotify":
            Inotify.open().close()  # asked for explicitly: refuse at start-up, not per stream
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        self.dir = state_subdir(self.state_dir, "sessions", dir_mode)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.retention_events = retention_events
        self.retention_ms = retention_ms
        self.retention = Retention(retention_events, retention_ms)
        self.poll_s = poll_ms / 1000
        self.watch = watch
        self.fsync = fsync
        self.max_cached_sessions = max_cached_sessions
        self._disk = SessionDisk(
            self.state_dir, self.retention, fsync=fsync, file_mode=file_mode, dir_mode=dir_mode
        )
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._guard = threading.Lock()
        self._watchers: dict[asyncio.AbstractEventLoop, Watchers] = {}

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> FileEventLog:
        """Build from `Settings` (state dir, the two `sse_retention_*` settings, `sse_watch`).

        Raises:
            ConfigError: `sse_watch` is `inotify` and inotify cannot be used here (names
                `SF_SSE_WATCH`, says why and what to set instead).
        """
        options: dict[str, Any] = {
            "file_mode": settings.file_mode,
            "dir_mode": settings.dir_mode,
            "watch": settings.sse_watch,
            **kwargs,
        }
        try:
            return cls(
                settings.require_state_dir(),
                settings.sse_retention_events,
                settings.sse_retention_ms,
                **options,
            )
        except OSError as exc:
            if options["watch"] != "inotify" or isinstance(exc, UnsafePath):
                raise
            raise ConfigError(
                "SF_SSE_WATCH",
                "inotify",
                f"inotify cannot be used here ({exc.strerror or exc}); "
                "set SF_SSE_WATCH=auto or poll to poll the session files instead",
            ) from exc

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
        event_id = await asyncio.to_thread(self._disk.append, s, data_json)
        self._notify(s)
        return event_id

    async def read_after(self, session: str, last_id: str | None) -> list[Event]:
        """See `EventLog.read_after`. Raises `InvalidEventId` for a malformed `last_id`, and
        `UnsafePath` when `sessions` is a link or not a folder."""
        position = None if last_id is None else parse_event_id(last_id)
        s = self._session(session)
        await self._refresh(s)
        return self.retention.select(s.view, last_id, position, now_ms())

    async def wait(self, session: str, last_id: str | None, timeout_s: float) -> bool:
        """See `EventLog.wait`: wakes on a local append at once, on another process's as soon
        as the session's watcher sees it (inotify), or within about `poll_ms` (polling)."""
        position = None if last_id is None else parse_event_id(last_id)
        sub = self.subscribe(session)
        try:
            s = sub.watch.s
            if self._disk.stale(s) or has_after(s.view, position):
                return True
            async with asyncio.timeout(timeout_s):
                await sub.wait()
        except TimeoutError:
            return False
        finally:
            sub.close()
        return True

    def subscribe(self, session: str) -> FileSubscription:
        """Hold `session` for one stream (`Subscribable`): its watcher is shared by every stream
        of the session on this event loop and closed with the last one. `close()` it.

        Raises:
            InvalidSessionId: the session id cannot name a file.
            OSError: `watch="inotify"` and inotify cannot be used.
        """
        s = self._session(session)
        loop = asyncio.get_running_loop()
        watchers = self._watchers.get(loop)
        if watchers is None:
            for old in [w for w in self._watchers.values() if w.loop.is_closed()]:
                del self._watchers[old.loop]  # a finished event loop's: its descriptor too
                old.close()
            watchers = Watchers(loop, self.dir, self.watch, self.poll_s, self._refresh)
            self._watchers[loop] = watchers
        return FileSubscription(self, watchers, watchers.acquire(s))

    def watching(self) -> dict[str, int]:
        """Sessions watched on the running event loop -> streams holding each (observability)."""
        watchers = self._watchers.get(asyncio.get_running_loop())
        if watchers is None:
            return {}
        return {name: w.refs for name, w in watchers.watches.items()}

    async def aclose(self) -> None:
        """Close every session watcher and the inotify descriptor (streams still open go on by
        re-reading the file every `poll_ms`); the log opens new ones if used again."""
        watchers, self._watchers = list(self._watchers.values()), {}
        for w in watchers:
            w.close()
        await asyncio.sleep(0)  # let the cancelled watch tasks finish

    def compact(self, session: str) -> None:
        """Drop what retention allows from one session file now (normally done on append)."""
        self._disk.compact(self._session(session))

    # -- in-memory bookkeeping -------------------------------------------------------------
    def _session(self, session: str) -> Session:
        validate_session_id(session)
        with self._guard:
            s = self._sessions.get(session)
            if s is None:
                s = Session(session, self.dir / f"{session}.log")
                self._sessions[session] = s
                if len(self._sessions) > self.max_cached_sessions:
                    for name in list(self._sessions)[: -self.max_cached_sessions]:
                        if self._sessions[name].waiters == 0:
                            del self._sessions[name]
            else:
                self._sessions.move_to_end(session)
            return s

    async def _refresh(self, s: Session) -> None:
        """Bring `s.view` up to date with the file when it may differ (one refresh at a time)."""
        if self._disk.stale(s):
            async with s.alock:
                if self._disk.stale(s):
                    try:
                        await asyncio.to_thread(self._disk.refresh, s)
                    except UnsafePath:
                        raise
                    except OSError as exc:  # a stream must not die: serve what is known
                        logger.error("session %s: cannot refresh: %s", s.name, exc)

    def _notify(self, s: Session) -> None:
        """A local append: wake the session's streams on every loop at once."""
        running = asyncio.get_running_loop()
        for loop, watchers in list(self._watchers.items()):
            watch = watchers.watches.get(s.name)
            if watch is None or watch.s is not s:
                continue
            if loop is running:
                watch.announce()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(watch.announce)


class FileSubscription:
    """One stream's hold on a session of a `FileEventLog` (`Subscription` in `_events.py`).

    The first read refreshes from the file; later ones read the view the session's watcher keeps
    current, with no I/O. After `FileEventLog.aclose()` it falls back to reading the file and
    sleeping `poll_ms` between reads.
    """

    __slots__ = ("_last", "_log", "_read_once", "_waiter", "_watchers", "watch")

    def __init__(self, log: FileEventLog, watchers: Watchers, watch: SessionWatch) -> None:
        self._log = log
        self._watchers = watchers
        self.watch = watch
        self._waiter = Waiter()
        self._read_once = False
        self._last: tuple[str | None, tuple[int, int] | None] = (None, None)
        watch.waiters.add(self._waiter)

    async def read_after(self, last_id: str | None, limit: int) -> list[Event]:
        if last_id is None:
            position = None
        elif last_id == self._last[0]:
            position = self._last[1]  # the id of the last event this read returned
        else:
            position = parse_event_id(last_id)
        watch, log = self.watch, self._log
        if watch.error is not None:
            raise watch.error
        if watch.closed or not self._read_once:
            await log._refresh(watch.s)
            self._read_once = True
        self._waiter.pending = False  # what the select below returns includes any wake so far
        view = watch.s.view
        out = log.retention.select(view, last_id, position, now_ms(), limit)
        tail = out[-1].id if out else None
        if tail is not None:
            # An id the view made (`<epoch>-<seq>`): split, not validated again on the next read.
            epoch, _, seq = tail.partition("-")
            self._last = (tail, (int(epoch), int(seq)))
        return out

    async def wait(self) -> None:
        if self.watch.closed:
            await asyncio.sleep(self._log.poll_s)
        else:
            await self._waiter.wait()

    def wake(self) -> None:
        self._waiter.wake()

    def close(self) -> None:
        """Release the hold (a second call does nothing)."""
        if self._waiter in self.watch.waiters:
            self.watch.waiters.discard(self._waiter)
            self._watchers.release(self.watch)
