"""One watcher per session per process: a session file read once, every stream of it woken.

`FileEventLog` (`_events_file.py`) holds a `Watchers` per event loop. A stream that follows a
session acquires that session's `SessionWatch` (created on first use, reference counted,
closed with its task when the last stream of the session ends) and parks a `Waiter` on it.
The watch learns that the file may have changed (below), reads what is new once (the log's
refresh, on a worker thread), and wakes every waiter; each stream then takes its next events
from the session's parsed view in memory, by its own position.

Deliberate choices:

* **inotify on the `sessions` folder, polling as the fallback.** One inotify descriptor per
  `Watchers` (so per log and event loop, not per stream or session) watches the folder; an event
  naming `<session>.log` (appended, replaced by a compaction, created, moved aside by a
  quarantine, deleted) marks that session's watch dirty. The descriptor lives as long as the
  log (`FileEventLog.aclose()` closes it), not as long as a session's streams: a user may hold
  128 inotify instances (`fs.inotify.max_user_instances`), and closing one waits for the
  kernel's RCU grace period (2-10 ms measured), so streams that come and go must not churn it.
  Where inotify is missing or refused (another OS, the per-user instance limit), or with
  `watch="poll"` (`SF_SSE_WATCH=poll`), each watched session is `stat`-ed every `poll_ms`.
* **A slow safety recheck even with inotify.** inotify reports only writes made through this
  kernel: a writer on another host of a network volume, or an event queue overflow, goes
  unseen. Every watched session's file is still `stat`-ed every `RECHECK_S` (one `stat` per
  watched session, not per stream), so such a change arrives within a second; a folder watch
  lost (the folder renamed or deleted) turns every watch to polling.
* **Rechecks and polls are one batch, off the event loop.** One task per `Watchers` `stat`s
  every watched file in one worker-thread call per period (`RECHECK_S`, or `poll_ms` when
  polling) and marks dirty the watches whose file changed (or is too recent to trust a
  `stat`): 10,000 watched sessions are 10,000 `stat`s on a worker thread, not on the loop.
* **Wake by comparing the view, not by who read it.** A watch wakes its waiters whenever the
  session's parsed view is not the one it last announced (another object after a reload or
  compaction, or more events), whoever refreshed it: a local append, another stream's first
  read, or the watch itself. A change is never missed because someone else read it first.
* **Waiting costs a future, never a task or a lock.** A waiter is one future, resolved by the
  watch (or by `wake()`, for shutdown); the watch never waits on a stream, so a slow client
  cannot hold up the others. What a stream holds of the session is its position and the
  bounded batch it is sending (see `follow_batches` in `_events.py`); events it has not taken
  yet stay in the session's view, which retention bounds, and a stream that falls behind
  retention gets a `lost` event, exactly as a client resuming from that position would.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ._errors import UnsafePath
from ._inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_DONT_FOLLOW,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)
from ._sessionfile import Session, stat_sig

__all__ = ["RECHECK_S", "WATCH_MODES", "SessionWatch", "Waiter", "Watchers"]

logger = logging.getLogger("sf_lifecycle.events.file")

#: `auto`: inotify where available, else polling; `inotify`: inotify or an error; `poll`.
WATCH_MODES = ("auto", "inotify", "poll")
#: With inotify, each watched session's file is still `stat`-ed this often (see module doc).
RECHECK_S = 1.0
_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
)
_LOST = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF


class Waiter:
    """One stream parked on a watch: `wait()` until `wake()` (from the watch or from shutdown).

    A wake that comes while the stream is not waiting (it is reading or sending) is kept in
    `pending`, so the next `wait()` returns at once: a wake is never lost. A reader that has
    just read everything clears it (what it read includes what the wake announced).
    """

    __slots__ = ("_fut", "pending")

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None
        self.pending = False

    async def wait(self) -> None:
        if self.pending:
            self.pending = False
            return
        fut = asyncio.get_running_loop().create_future()
        self._fut = fut
        try:
            await fut
        finally:
            self._fut = None

    def wake(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        else:
            self.pending = True


class SessionWatch:
    """One session's watcher on one event loop: refreshes the file once, wakes every waiter."""

    def __init__(self, owner: Watchers, s: Session) -> None:
        self.owner = owner
        self.s = s
        self.refs = 0
        self.waiters: set[Waiter] = set()
        self.error: UnsafePath | None = None
        self.closed = False
        self.dirty = asyncio.Event()
        self._seen_view = s.view
        self._seen_len = len(s.view.seqs)
        self.task = owner.loop.create_task(self._run(), name=f"sf-session-watch-{s.name}")

    def announce(self) -> None:
        """Wake every waiter if the session's view is not the one last announced."""
        view = self.s.view
        n = len(view.seqs)
        if view is self._seen_view and n == self._seen_len:
            return
        self._seen_view, self._seen_len = view, n
        self.wake_all()

    def wake_all(self) -> None:
        for w in self.waiters:
            w.wake()

    async def _run(self) -> None:
        owner, s = self.owner, self.s
        while True:
            await self.dirty.wait()  # inotify, a local append, or the owner's batched recheck
            self.dirty.clear()  # before reading: a change during the read marks it again
            try:
                await owner.refresh(s)
            except UnsafePath as exc:
                if self.error is None:
                    self.error = exc
                    self.wake_all()  # each stream re-reads, raises, and ends with a log line
                continue
            except Exception:  # never let the watch die: its streams would wait forever
                logger.exception("session %s: watch failed to read the file", s.name)
                await asyncio.sleep(owner.recheck_s)
                continue
            self.error = None
            self.announce()


class Watchers:
    """The watched sessions of one `FileEventLog` on one event loop, and how changes are seen.

    Args:
        loop: The event loop every watch and waiter belongs to.
        directory: The `sessions` folder (already checked not to be a link).
        mode: One of `WATCH_MODES`.
        poll_s: Polling period when inotify is not used.
        refresh: Brings a session's view up to date with its file when it may differ
            (`UnsafePath` when the folder is unsafe).

    Raises:
        OSError: `mode` is `inotify` and inotify cannot be used.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        directory: Path,
        mode: str,
        poll_s: float,
        refresh: Callable[[Session], Awaitable[None]],
    ) -> None:
        if mode not in WATCH_MODES:
            raise ValueError(f"watch must be one of {', '.join(WATCH_MODES)}, not {mode!r}")
        self.loop = loop
        self.poll_s = poll_s
        self.refresh = refresh
        self.watches: dict[str, SessionWatch] = {}
        self.inotify: Inotify | None = None
        self._recheck: asyncio.Task[None] | None = None
        self.recheck_s = poll_s
        if mode != "poll":
            try:
                ino = Inotify.open()
                try:
                    ino.add_watch(directory, _MASK)
                    loop.add_reader(ino.fd, self._on_readable)
                except BaseException:
                    ino.close()
                    raise
            except OSError as exc:
                if mode == "inotify":
                    raise
                logger.warning("session events: inotify unavailable (%s); polling files", exc)
            else:
                self.inotify = ino
                self.recheck_s = RECHECK_S

    @property
    def mode(self) -> str:
        """`inotify` or `poll`: how changes are seen now."""
        return "inotify" if self.inotify is not None else "poll"

    def acquire(self, s: Session) -> SessionWatch:
        """The session's watch, created on first use; pair with `release`."""
        watch = self.watches.get(s.name)
        if watch is None or watch.s is not s:
            watch = SessionWatch(self, s)
            self.watches[s.name] = watch
            s.waiters += 1  # a watched session stays in the log's cache
        watch.refs += 1
        if self._recheck is None or self._recheck.done():
            self._recheck = self.loop.create_task(self._recheck_all(), name="sf-session-recheck")
        return watch

    async def _recheck_all(self) -> None:
        """Every `recheck_s`, `stat` every watched file in one worker-thread call; mark dirty
        the watches whose file may differ from what was read (see module doc)."""
        while self.watches:
            await asyncio.sleep(self.recheck_s)
            watches = [w for w in self.watches.values() if not w.dirty.is_set()]
            if not watches:
                continue
            try:
                sigs = await asyncio.to_thread(_stat_all, [w.s.path for w in watches])
            except Exception:  # never let the recheck die: polling streams would wait forever
                logger.exception("session events: recheck of the session files failed")
                continue
            for w, sig in zip(watches, sigs, strict=True):
                s = w.s
                if sig is _UNKNOWN:
                    continue  # a stat refused: logged by the refresh that fails on it
                if not s.loaded or not s.trusted or sig != s.sig:
                    w.dirty.set()

    def release(self, watch: SessionWatch) -> None:
        """Drop one reference; the last one closes the session's watch and its task."""
        watch.refs -= 1
        if watch.refs <= 0 and not watch.closed:
            self._close_watch(watch)

    def _close_watch(self, watch: SessionWatch) -> None:
        watch.closed = True
        watch.task.cancel()
        watch.s.waiters -= 1
        if self.watches.get(watch.s.name) is watch:
            del self.watches[watch.s.name]
        if not self.watches and self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        watch.wake_all()

    def close(self) -> None:
        """Close every watch and the inotify descriptor (waiters are woken)."""
        for watch in list(self.watches.values()):
            self._close_watch(watch)
        self._close_source()

    def _close_source(self) -> None:
        ino, self.inotify = self.inotify, None
        self.recheck_s = self.poll_s
        if ino is None:
            return
        if self.loop.is_closed():
            ino.close()
            return
        self.loop.remove_reader(ino.fd)
        # Closing an inotify descriptor waits for the kernel's RCU grace period (2-10 ms
        # measured): on a worker thread, so the streams of other sessions do not wait for it.
        try:
            self.loop.run_in_executor(None, ino.close)
        except RuntimeError:  # the executor is shut down: the loop is finishing
            ino.close()

    def _on_readable(self) -> None:
        ino = self.inotify
        if ino is None:
            return
        try:
            events = ino.read()
        except OSError as exc:
            logger.error("session events: inotify read failed (%s); polling files", exc)
            events = []
            self._close_source()
        for ev in events:
            if ev.mask & _LOST:
                # Events dropped, or the folder itself moved or deleted: look at every file.
                if ev.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    logger.warning("session events: the sessions folder changed; polling files")
                    self._close_source()
                for watch in self.watches.values():
                    watch.dirty.set()
                continue
            if ev.name.endswith(b".log"):
                hit = self.watches.get(ev.name[:-4].decode("ascii", "replace"))
                if hit is not None:
                    hit.dirty.set()


_UNKNOWN = (-1, -1, -1)


def _stat_all(paths: list[Path]) -> list[tuple[int, int, int] | None]:
    """Each file's `stat_sig` (None: missing; `_UNKNOWN`: refused), on a worker thread."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            out.append(stat_sig(os.stat(path, follow_symlinks=False)))
        except FileNotFoundError:
            out.append(None)
        except OSError:
            out.append(_UNKNOWN)
    return out
