"""One session file of `FileEventLog`: its record in memory, its lock, its whole rewrite, and
moving it (or anything planted in its place) aside.

The choices these keep (lock around append, a file's identity in its header, no link followed,
corruption quarantined, never deleted) are explained in `_events_file.py`; reading and appending
are in `_sessiondisk.py`. Every function here runs on a worker thread, with the `sessions`
folder open as `dfd` (names resolved relative to it) and, where it says so, the session's lock
held.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ._errors import UnsafePath
from ._sessionview import EMPTY, MAX_NUMBER, View, encode_header, encode_line
from ._statefiles import file_kind

__all__ = [
    "LOCK_FLAGS",
    "NOFOLLOW",
    "RACY_NS",
    "READ_FLAGS",
    "Session",
    "exists",
    "kind",
    "locked",
    "new_epoch",
    "now_ms",
    "open_regular",
    "pread",
    "quarantine",
    "rewrite",
    "seen",
    "set_aside",
    "stat_sig",
    "write_all",
    "write_file",
]

logger = logging.getLogger("sf_lifecycle.events.file")


class Session:
    """One session's file as this process knows it: names, parsed view, identity, lock."""

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
        self.waiters = 0  # watchers holding it: not dropped from the log's cache
        self.last_epoch = 0


def stat_sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seen(s: Session, st: os.stat_result) -> None:
    """Record the stat `s.view` matches (taken before reading, so growth shows later)."""
    s.sig = stat_sig(st)
    s.trusted = time.time_ns() - st.st_mtime_ns > RACY_NS


@contextlib.contextmanager
def locked(s: Session, dfd: int, file_mode: int) -> Iterator[None]:
    """The cross-process lock of a session (`flock` on `<session>.lock`, the lock the
    `filelock` package takes too). Re-entrant; the caller holds `s.mutex`."""
    if s.lock_depth == 0:
        for _ in range(3):
            fd = open_regular(s.lock_name, LOCK_FLAGS, dfd, file_mode)
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


def open_regular(name: str, flags: int, dfd: int, file_mode: int) -> int | None:
    """Open `name` (created when `flags` say so) if it is a regular file; anything else
    under that name (a link, folder, socket, FIFO, device) is moved aside and None is
    returned, for the caller to try again."""
    try:
        fd = os.open(name, flags, file_mode, dir_fd=dfd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV):
            raise
        set_aside(dfd, name, None)
        return None
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISREG(st.st_mode):
        return fd
    try:
        set_aside(dfd, name, st)  # still open: its inode cannot be reused meanwhile
    finally:
        os.close(fd)
    return None


def quarantine(
    s: Session, dfd: int, judged: os.stat_result | None, reason: str, file_mode: int
) -> bool:
    """Move the log aside if its name still refers to `judged` (the file found corrupt);
    False when the name now refers to another file (to be read instead)."""
    with locked(s, dfd, file_mode):
        try:
            now = os.stat(s.log_name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            s.view, s.consumed, s.sig, s.header, s.loaded = EMPTY, 0, None, b"", True
            return True
        if judged is not None and (now.st_dev, now.st_ino) != (judged.st_dev, judged.st_ino):
            return False
        target = f"{s.name}.corrupt-{now_ms()}"
        n = 0
        while exists(target, dfd):
            n += 1
            target = f"{s.name}.corrupt-{now_ms()}.{n}"
        try:
            os.rename(s.log_name, target, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            logger.error("session %s: corrupt (%s) and cannot quarantine: %s", s.name, reason, exc)
            s.sig, s.header, s.view, s.loaded = stat_sig(now), b"", EMPTY, True
            return True
    logger.error(
        "session %s: log corrupt (%s); moved to %s, the session starts a new epoch",
        s.name,
        reason,
        target,
    )
    s.view, s.consumed, s.sig, s.header, s.loaded = EMPTY, 0, None, b"", True
    return True


def new_epoch(s: Session) -> int:
    epoch = max(now_ms(), s.last_epoch + 1)
    # An epoch at the id width (a clock far in the future once): ids stay parseable, and
    # a client holding an old id still gets its `reset` (epochs are compared for equality).
    return epoch if epoch <= MAX_NUMBER else now_ms()


def rewrite(s: Session, dfd: int, floor: int, file_mode: int, fsync: bool) -> None:
    """Rewrite the file without the events at or below `floor` (retention's compaction)."""
    view = s.view
    assert view.epoch is not None
    start = bisect.bisect_right(view.seqs, floor)
    kept = View(view.epoch, max(floor, view.floor), view.seqs[start:], view.events[start:])
    write_file(s, dfd, kept, create=False, file_mode=file_mode, fsync=fsync)
    logger.info(
        "session %s: compacted to %d event(s) after %s-%d",
        s.name,
        len(kept.seqs),
        kept.epoch,
        kept.floor,
    )


def write_file(
    s: Session, dfd: int, view: View, *, create: bool, file_mode: int, fsync: bool
) -> None:
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
            set_aside(dfd, s.tmp_name, leftover)  # planted: moved aside, never deleted
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW
    fd = os.open(s.tmp_name, flags, file_mode, dir_fd=dfd)
    try:
        write_all(fd, blob)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if create:
        os.link(s.tmp_name, s.log_name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        os.unlink(s.tmp_name, dir_fd=dfd)
    else:
        os.replace(s.tmp_name, s.log_name, src_dir_fd=dfd, dst_dir_fd=dfd)
    if fsync:
        os.fsync(dfd)
    st = os.stat(s.log_name, dir_fd=dfd, follow_symlinks=False)
    s.view, s.consumed, s.header = view, len(blob), header + b"\n"
    seen(s, st)
    s.last_epoch = max(s.last_epoch, view.epoch or 0)


NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Within this of a file's mtime, an unchanged stat does not prove an unchanged file (a
#: file-system clock ticks every few ms; a peer on another host may be a little off).
RACY_NS = 1_000_000_000


def pread(fd: int, n: int, offset: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return out


def kind(mode: int) -> str:
    """What a refused entry under a session's name is, for the log line."""
    if stat.S_ISLNK(mode):
        return "a symbolic link (refused: the state directory holds no links)"
    return f"{file_kind(mode)}, not a regular file"


def set_aside(dfd: int, name: str, judged: os.stat_result | None) -> None:
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
    target = f"{name}.corrupt-{now_ms()}"
    n = 0
    while exists(target, dfd):
        n += 1
        target = f"{name}.corrupt-{now_ms()}.{n}"
    try:
        os.rename(name, target, src_dir_fd=dfd, dst_dir_fd=dfd)
    except FileNotFoundError:
        return
    logger.error("sessions/%s is %s; moved aside to sessions/%s", name, kind(now.st_mode), target)


def exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
