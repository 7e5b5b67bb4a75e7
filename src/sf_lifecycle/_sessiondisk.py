"""Reading and appending the session files of `FileEventLog`, on worker threads.

`SessionDisk` keeps each `Session`'s view up to date with its file (`refresh`: only what is new
when the file is the incarnation already parsed, the whole file otherwise; quarantine when it
fails to parse from its first byte) and appends under the session's locks, compacting when
retention allows. Why it works this way (identity by header, no link followed, torn lines) is
in `_events_file.py`; the primitives it uses are in `_sessionfile.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ._errors import DiskWriteError, UnsafePath
from ._events import Event
from ._sessionfile import (
    NOFOLLOW,
    RACY_NS,
    READ_FLAGS,
    Session,
    kind,
    locked,
    new_epoch,
    now_ms,
    pread,
    quarantine,
    rewrite,
    seen,
    stat_sig,
    write_all,
    write_file,
)
from ._sessionview import (
    EMPTY,
    MAX_NUMBER,
    Corrupt,
    Retention,
    View,
    encode_line,
    parse_header,
    parse_lines,
)
from ._statefiles import open_state_dir

__all__ = ["SessionDisk"]

logger = logging.getLogger("sf_lifecycle.events.file")


class SessionDisk:
    """The `sessions` folder under `state_dir`: each session's file read, appended, compacted.

    Args:
        state_dir: The state directory; `sessions` below it is opened without following links.
        retention: What a reader may still see; an append compacts past it.
        fsync: fsync each append and rewrite.
        file_mode: Mode of the files created.
        dir_mode: Mode of the `sessions` folder when it is created.
    """

    def __init__(
        self, state_dir: Path, retention: Retention, *, fsync: bool, file_mode: int, dir_mode: int
    ) -> None:
        self.state_dir = state_dir
        self.retention = retention
        self.fsync = fsync
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def stale(self, s: Session) -> bool:
        """Whether the file may differ from `s.view` (event loop: one `stat`, rarely a read)."""
        if not s.loaded:
            return True
        try:
            st = os.stat(s.path, follow_symlinks=False)
        except FileNotFoundError:
            return s.sig is not None
        except OSError:
            return False  # logged by the refresh that failed; retried when the file changes
        if stat_sig(st) != s.sig:
            return True
        if s.trusted:
            return False
        # Inode, size and mtime can all match a different file: another replica's compaction
        # can get the same inode number back, within one tick of the file-system clock. Until
        # the file is older than that, its header (which names the incarnation) decides.
        try:
            with self.open_dir(create=False) as dfd:
                fd = os.open(s.log_name, READ_FLAGS, dir_fd=dfd)
                try:
                    same = (
                        stat_sig(os.fstat(fd)) == s.sig and pread(fd, len(s.header), 0) == s.header
                    )
                finally:
                    os.close(fd)
        except OSError:
            return True
        if same and time.time_ns() - st.st_mtime_ns > RACY_NS:
            s.trusted = True
        return not same

    # -- disk (worker threads) -------------------------------------------------------------
    @contextlib.contextmanager
    def open_dir(self, *, create: bool = True) -> Iterator[int]:
        """The `sessions` folder, opened without following a link at any step (see
        `_statefiles`): every name below is resolved relative to it."""
        fd = open_state_dir(self.state_dir, "sessions", self.dir_mode if create else None)
        try:
            yield fd
        finally:
            os.close(fd)

    def refresh(self, s: Session) -> None:
        """`refresh_sync` with the session's in-process mutex taken."""
        with s.mutex, self.open_dir() as dfd:
            self.refresh_sync(s, dfd)

    def refresh_sync(self, s: Session, dfd: int) -> None:
        """Bring `s.view` up to date with the file. Caller holds `s.mutex`.

        Everything is judged on one open descriptor, so on one incarnation of the file whatever
        another replica renames meanwhile. Only a file that fails to parse from its first byte
        is quarantined, and only if its name still refers to it.
        """
        for _ in range(3):
            try:
                fd = os.open(s.log_name, READ_FLAGS, dir_fd=dfd)
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
                if quarantine(s, dfd, judged, kind(judged.st_mode), self.file_mode):
                    return
                continue
            try:
                # fstat before any read: a folder opens fine and fails only when read.
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    reason = kind(st.st_mode)
                else:
                    try:
                        with open(fd, "rb", closefd=False) as f:
                            self._read(s, f, st)
                        return
                    except Corrupt as exc:
                        reason = str(exc)
                    except OSError as exc:
                        logger.error("session %s: cannot read %s: %s", s.name, s.path, exc)
                        s.sig, s.loaded = stat_sig(st), True  # not retried until the file changes
                        return
                # Still open here, so its inode number cannot be reused before the comparison.
                if quarantine(s, dfd, st, reason, self.file_mode):
                    return
            finally:
                os.close(fd)
        logger.error("session %s: %s keeps changing under the reader", s.name, s.path)
        s.loaded = True

    def _read(self, s: Session, f: BinaryIO, st: os.stat_result) -> None:
        """Read what is new in the open file `f`; the whole file unless it is the incarnation
        `s.view` came from (same header line, not shorter than what was parsed)."""
        view = s.view
        fd = f.fileno()
        if (
            s.loaded
            and view.epoch is not None
            and s.header
            and st.st_size >= s.consumed
            and pread(fd, len(s.header), 0) == s.header
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
                seen(s, st)
                return
        self._load(s, f, st)

    def _load(self, s: Session, f: BinaryIO, st: os.stat_result) -> None:
        f.seek(0)
        raw = f.read()
        nl = raw.find(b"\n")
        if nl < 0:
            raise Corrupt("no header line")
        epoch, floor = parse_header(raw[:nl])
        view = View(epoch, floor, [], [])
        used = parse_lines(raw[nl + 1 :], view, s.path)
        s.view, s.consumed, s.header, s.loaded = view, nl + 1 + used, raw[: nl + 1], True
        seen(s, st)
        s.last_epoch = max(s.last_epoch, epoch)

    def append(self, s: Session, data_json: str) -> str:
        """Append one event (JSON text) under the session's locks; its id. `DiskWriteError` when
        the disk refused it, `UnsafePath` for a link."""
        try:
            with s.mutex, self.open_dir() as dfd, locked(s, dfd, self.file_mode):
                self.refresh_sync(s, dfd)
                if s.view.epoch is None:
                    self._create(s, dfd)
                elif s.view.head >= MAX_NUMBER:  # 10**18 events: ids stay 18 digits wide
                    logger.warning("session %s: sequence exhausted; new epoch", s.name)
                    self._write(s, dfd, View(new_epoch(s), 0, [], []), create=False)
                elif s.sig is not None and s.sig[1] > s.consumed:
                    # A torn last line: its writer died mid-write (we hold the lock, so nobody
                    # is writing now). Cut it off so this line does not glue onto it.
                    logger.warning(
                        "session %s: truncating %d byte(s) of a torn last line",
                        s.name,
                        s.sig[1] - s.consumed,
                    )
                    fd = os.open(s.log_name, os.O_WRONLY | NOFOLLOW, dir_fd=dfd)
                    try:
                        os.ftruncate(fd, s.consumed)
                    finally:
                        os.close(fd)
                view = s.view
                assert view.epoch is not None
                seq, ts = view.head + 1, now_ms()
                line = encode_line(seq, ts, data_json)
                fd = os.open(s.log_name, os.O_WRONLY | os.O_APPEND | NOFOLLOW, dir_fd=dfd)
                try:
                    write_all(fd, line)
                    if self.fsync:
                        os.fsync(fd)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                event = Event(f"{view.epoch}-{seq}", data_json, ts)
                view.events.append(event)
                view.seqs.append(seq)
                s.consumed += len(line)
                seen(s, st)
                if self.retention.needs_compaction(view, ts):
                    try:
                        rewrite(s, dfd, self.retention.floor(view, ts), self.file_mode, self.fsync)
                    except OSError as exc:  # the event is stored: say so, retry next time
                        logger.error("session %s: compaction failed: %s", s.name, exc)
                return event.id  # type: ignore[return-value]
        except UnsafePath:
            raise
        except OSError as exc:
            raise DiskWriteError(
                exc.errno, f"session {s.name}: append failed: {exc.strerror or exc}"
            ) from exc

    def compact(self, s: Session) -> None:
        """Drop what retention allows from one session file now (normally done on append)."""
        with s.mutex, self.open_dir() as dfd, locked(s, dfd, self.file_mode):
            self.refresh_sync(s, dfd)
            if s.view.epoch is not None:
                rewrite(s, dfd, self.retention.floor(s.view, now_ms()), self.file_mode, self.fsync)

    def _create(self, s: Session, dfd: int) -> None:
        self._write(s, dfd, View(new_epoch(s), 0, [], []), create=True)

    def _write(self, s: Session, dfd: int, view: View, *, create: bool) -> None:
        write_file(s, dfd, view, create=create, file_mode=self.file_mode, fsync=self.fsync)
