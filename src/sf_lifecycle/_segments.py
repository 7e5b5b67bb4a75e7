"""The on-disk layout of the feedback queue: names, listing, reading, locks, quarantine.

`<state_dir>/feedback/` holds, per process token (12 hex digits of a millisecond clock, then
10 random ones):

- `<token>.lock`: held with `flock` by the owner for its lifetime, taken before its first
  segment exists; the kernel drops it when the process dies, which is how everyone else learns
  that the token's segments are orphans (never by PID or file age);
- `<token>.<seq>.log`: the segment being appended to, then `<token>.<seq>.draining` once a
  drain renamed it. `seq` is printed with at least six digits and read with any number,
  ordered numerically (issue 11: a fixed width strands every file past 999,999, ~55 h of steady
  traffic for one process);
- `quarantine/`: files with damage, moved aside after their good records were delivered, and
  `<token>.<seq>.<ids digest>.rejected` files holding the frames of records the sink can never
  store (`RecordsRejected`), each with a `.rejected.reason` beside it (ids and why); one per
  segment and set of ids, however often the segment is retried; never deleted.

Nothing here is opened through a symbolic link: a segment or lock name that is not a regular
file is refused (`NotASegment`, `LockRefused`) and left for an operator. Every `os` call goes
through `_fs.os`, the seam the fault-injection and power-loss tests replace.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import _fs
from ._framing import CHUNK, FrameStream, encode
from ._ids import ID_RE
from ._statefiles import DEFAULT_FILE_MODE, file_kind, open_state_dir, state_subdir

__all__ = [
    "LOCK_RE",
    "SEG_RE",
    "Flock",
    "Loaded",
    "LockRefused",
    "NotASegment",
    "Record",
    "SegmentReader",
    "fsync_dir",
    "list_segments",
    "load_segment",
    "lock_path",
    "new_token",
    "probe_lock",
    "quarantine_census",
    "quarantine_file",
    "quarantine_records",
    "segment_path",
    "try_lock",
]

logger = logging.getLogger("sf_lifecycle.queue")

Record = dict[str, Any]

#: The C scanner behind `json.loads`: (value, end) of the JSON text at an index.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

SEG_RE = re.compile(r"(?P<token>[0-9a-f]{22})\.(?P<seq>[0-9]{6,})\.(?P<kind>log|draining)\Z")
LOCK_RE = re.compile(r"(?P<token>[0-9a-f]{22})\.lock\Z")


def new_token() -> str:
    """A process token: a 48-bit millisecond clock (names sort by age) and 40 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{_fs.os.urandom(5).hex()}"


def segment_path(directory: Path, token: str, seq: int) -> Path:
    """The `.log` segment number `seq` of `token`."""
    return directory / f"{token}.{seq:06d}.log"


def lock_path(directory: Path, token: str) -> Path:
    """The lock file of `token`."""
    return directory / f"{token}.lock"


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a create, rename or unlink) survive a power cut."""
    fd = _fs.os.open(
        path, _fs.os.O_RDONLY | _fs.os.O_DIRECTORY | _fs.os.O_NOFOLLOW | _fs.os.O_CLOEXEC
    )
    try:
        _fs.os.fsync(fd)
    finally:
        _fs.os.close(fd)


def list_segments(directory: Path) -> dict[str, list[tuple[int, str, Path]]]:
    """token -> [(seq, kind, path)] sorted by seq; lock-only tokens map to []."""
    out: dict[str, list[tuple[int, str, Path]]] = {}
    try:
        fd = open_state_dir(directory.parent, directory.name, None)  # UnsafePath: a link
    except FileNotFoundError:
        return out
    try:
        names = _fs.os.listdir(fd)  # the folder just checked, whatever its name points to now
    finally:
        _fs.os.close(fd)
    for name in names:
        m = SEG_RE.match(name)
        if m is not None:
            out.setdefault(m["token"], []).append((int(m["seq"]), m["kind"], directory / name))
            continue
        m = LOCK_RE.match(name)
        if m is not None:
            out.setdefault(m["token"], [])
    for files in out.values():
        files.sort()
    return out


# -- reading -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Loaded:
    """A decoded segment: its good records and where it is damaged or torn."""

    records: list[Record] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    torn_at: int | None = None
    size: int = 0


class NotASegment(Exception):
    """A directory entry named like a segment that is not a regular file (refused, never read)."""


def _open_segment(path: Path) -> int:
    """A read descriptor on the regular file `path`, never through a link nor blocking on a FIFO.

    Raises:
        NotASegment: a symbolic link, directory, FIFO or device under a segment's name.
    """
    try:
        fd = _fs.os.open(
            path, _fs.os.O_RDONLY | _fs.os.O_NOFOLLOW | _fs.os.O_NONBLOCK | _fs.os.O_CLOEXEC
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotASegment(
                "a symbolic link (refused: the state directory holds no links)"
            ) from None
        raise
    if not stat.S_ISREG(_fs.os.fstat(fd).st_mode):
        _fs.os.close(fd)
        raise NotASegment("not a regular file")
    return fd


class SegmentReader:
    """A segment decoded batch by batch, in bounded memory (one piece of the file, one batch).

    Opened without following a symbolic link and without blocking (a FIFO), then checked to be a
    regular file: anything else in the queue directory is someone else's doing, and reading
    through a link could deliver (then unlink) files outside the state directory. Reading never
    raises for bad content: `problems` (framing damage, bad JSON, a record without a valid id)
    and `torn_at` are complete once `batch` has returned [].

    `batch` runs on a worker thread while the event loop may call `close`: a close that comes
    while a batch is being read is carried out by that batch when it ends.

    Raises:
        NotASegment: `path` is a symbolic link, directory, FIFO or device.
        OSError: opening failed (FileNotFoundError: delivered by someone else meanwhile).
    """

    def __init__(self, path: Path, chunk: int = CHUNK) -> None:
        self.path = path
        fd = _open_segment(path)
        try:
            self._file: BinaryIO | None = open(fd, "rb", buffering=0)  # noqa: SIM115 (closed by close)
        except BaseException:
            _fs.os.close(fd)
            raise
        self._frames = FrameStream(self._file.read, chunk)
        self._problems: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._close_asked = False

    @property
    def problems(self) -> list[tuple[int, str]]:
        """(offset, reason) of every damaged or refused record read so far, by offset."""
        out = [(d.offset, d.reason) for d in self._frames.damage] + self._problems
        out.sort()
        return out

    @property
    def torn_at(self) -> int | None:
        """Offset of a torn tail (an unacknowledged, cut-off last write), or None."""
        return self._frames.torn_at

    @property
    def size(self) -> int:
        """Bytes read so far (the file's size once done)."""
        return self._frames.size

    def batch(self, limit: int) -> list[Record]:
        """The next up to `limit` good records, in file order; [] at the end of the file.

        Raises:
            OSError: reading failed (EIO); the file stays for the next attempt.
        """
        try:
            with self._lock:
                return self._decode(limit)
        finally:
            if self._close_asked:
                self.close()

    def _decode(self, limit: int) -> list[Record]:
        out: list[Record] = []
        frames = self._frames
        loads, scan = json.loads, _SCAN
        valid_id = ID_RE.match
        while not out and not frames.done:
            if self._file is None:
                raise ValueError(f"{self.path.name}: read after close")
            for offset, payload in frames.frames(limit):
                # json.loads' own scanner, without its per-call encoding detection and
                # whitespace skipping (the queue writes compact UTF-8); anything else, and
                # every error message, goes through json.loads itself.
                try:
                    text = payload.decode()
                    record, end = scan(text, 0)
                    if end != len(text):
                        raise ValueError("trailing data")
                except (ValueError, StopIteration):
                    try:
                        record = loads(payload)
                    except ValueError as exc:
                        self._problems.append((offset, f"bad JSON: {exc}"))
                        continue
                rid = record.get("id") if type(record) is dict else None
                if type(rid) is not str or valid_id(rid) is None:
                    self._problems.append((offset, "record without a valid id"))
                    continue
                out.append(record)
        return out

    def close(self) -> None:
        """Close the file now, or when the batch being read ends (never blocks)."""
        self._close_asked = True
        if self._lock.acquire(blocking=False):
            try:
                f, self._file = self._file, None
                if f is not None:
                    f.close()
            finally:
                self._lock.release()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_segment(path: Path) -> Loaded:
    """Read and decode a whole segment (worker thread; small files, tools and tests).

    Never raises for bad content. Delivery reads with `SegmentReader` instead, whose memory
    does not grow with the file.

    Raises:
        NotASegment: a symbolic link, directory, FIFO or device under a segment's name.
    """
    with SegmentReader(path) as reader:
        records: list[Record] = []
        while batch := reader.batch(1 << 30):
            records += batch
        return Loaded(records, reader.problems, reader.torn_at, reader.size)


def quarantine_file(
    path: Path, problems: list[tuple[int, str]], state_dir: Path, dir_mode: int
) -> None:
    """Move `path` into `<state_dir>/feedback/quarantine/` (a free name), fsync both folders.

    Raises:
        OSError: the move failed; the file stays where it was.
    """
    for offset, reason in problems:
        logger.warning("corrupt record in %s at offset %d: %s", path, offset, reason)
    state_subdir(state_dir, "feedback/quarantine", dir_mode)  # no link, anywhere
    quarantine_dir = state_dir / "feedback" / "quarantine"
    target = quarantine_dir / path.name
    n = 0
    while target.exists():
        n += 1
        target = quarantine_dir / f"{path.name}.{n}"
    _fs.os.rename(path, target)
    fsync_dir(quarantine_dir)
    fsync_dir(quarantine_dir.parent)
    logger.warning(
        "quarantined %s as %s after delivering its good records (%d problem(s), first at "
        "offset %d: %s)",
        path.name,
        target,
        len(problems),
        problems[0][0],
        problems[0][1],
    )


def quarantine_records(
    source: Path,
    records: list[Record],
    reason: str,
    state_dir: Path,
    dir_mode: int,
    file_mode: int = DEFAULT_FILE_MODE,
) -> tuple[Path, bool]:
    """Write `records` (taken from segment `source`) as frames to
    `<state_dir>/feedback/quarantine/<token>.<seq>.<ids digest>.rejected`, with `<file>.reason`
    naming their ids and `reason`; each written to a temporary name, fsynced, renamed, then the
    folder fsynced. Returns the frames file and whether it is new.

    The name depends only on the segment and the rejected ids, so a retry of the same file
    (a later batch failed, or the process died before the segment was removed) finds both
    files there and writes nothing: one copy, counted once.

    Raises:
        OSError: writing failed; the caller keeps the segment, so nothing is lost.
    """
    quarantine_dir = state_dir / "feedback" / "quarantine"
    m = SEG_RE.match(source.name)
    stem = f"{m['token']}.{m['seq']}" if m else source.name
    digest = hashlib.sha256("\n".join(r["id"] for r in records).encode()).hexdigest()[:16]
    target = quarantine_dir / f"{stem}.{digest}.rejected"
    note_path = Path(f"{target}.reason")
    state_subdir(state_dir, "feedback/quarantine", dir_mode)  # no link, anywhere
    if all(_is_file(p) for p in (target, note_path)):
        return target, False
    frames = b"".join(
        encode(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode()) for r in records
    )
    note = "".join(f"{r['id']}\t{reason}\n" for r in records).encode()
    flags = _fs.os.O_WRONLY | _fs.os.O_CREAT | _fs.os.O_TRUNC | _fs.os.O_NOFOLLOW
    for path, data in ((target, frames), (note_path, note)):
        tmp = quarantine_dir / f".{path.name}.tmp"
        fd = _fs.os.open(tmp, flags | _fs.os.O_CLOEXEC, file_mode)
        try:
            view = memoryview(data)
            while view:
                view = view[_fs.os.write(fd, view) :]
            _fs.os.fsync(fd)
        finally:
            _fs.os.close(fd)
        _fs.os.rename(tmp, path)
    fsync_dir(quarantine_dir)
    return target, True


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(_fs.os.stat(path, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def quarantine_census(state_dir: Path, *, records: bool = True) -> tuple[int, int]:
    """(files, rejected records) in `<state_dir>/feedback/quarantine/`: every entry but the
    `.reason` companions and unfinished temporary files, and the ids the `.reason` files of
    `.rejected` files name (0 unless `records`: a probe only lists the folder). Nothing is
    followed through a link."""
    try:
        fd = open_state_dir(state_dir, "feedback/quarantine", None)
    except FileNotFoundError:
        return 0, 0
    try:
        names = _fs.os.listdir(fd)
        files = [n for n in names if not n.endswith((".reason", ".tmp"))]
        count = 0
        for name in files if records else ():
            if not name.endswith(".rejected") or f"{name}.reason" not in names:
                continue
            flags = _fs.os.O_RDONLY | _fs.os.O_NOFOLLOW | _fs.os.O_NONBLOCK | _fs.os.O_CLOEXEC
            try:
                note = _fs.os.open(f"{name}.reason", flags, dir_fd=fd)
            except OSError as exc:  # a link (ELOOP), gone, unreadable
                logger.warning("quarantine/%s.reason not read: %s", name, exc.strerror)
                continue
            if not stat.S_ISREG(_fs.os.fstat(note).st_mode):  # a FIFO, a directory
                _fs.os.close(note)
                logger.warning("quarantine/%s.reason is not a regular file: skipped", name)
                continue
            with open(note, "rb") as f:
                count += sum(1 for line in f if line.strip())
        return len(files), count
    finally:
        _fs.os.close(fd)


# -- locks ---------------------------------------------------------------------------------------
class LockRefused(Exception):
    """A `.lock` name that is not a regular file: never opened through, its token skipped."""


class Flock:
    """An exclusive `flock` on an open lock file; the kernel drops it when the process dies."""

    __slots__ = ("fd", "lock_file")

    def __init__(self, lock_file: Path, fd: int) -> None:
        self.lock_file = lock_file
        self.fd: int | None = fd

    def release(self) -> None:
        """Close the descriptor, which drops the lock (the file stays)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            _fs.os.close(fd)  # closing the only descriptor releases the flock


def try_lock(path: Path, mode: int = DEFAULT_FILE_MODE) -> Flock | None:
    """Take `path`'s flock without waiting; None when someone holds it.

    Created when missing; never opened through a link, and anything but a regular file (a
    directory, FIFO, device) is refused before it is opened for real.

    Raises:
        LockRefused: `path` is a symbolic link, directory or other non-regular file.
        OSError: any other failure (EACCES, EMFILE, EIO...).
    """
    try:
        st_mode = _fs.os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st_mode):
            raise LockRefused(_kind(st_mode))
    flags = (
        _fs.os.O_RDWR | _fs.os.O_CREAT | _fs.os.O_NOFOLLOW | _fs.os.O_NONBLOCK | _fs.os.O_CLOEXEC
    )
    try:
        fd = _fs.os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockRefused("a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise LockRefused("a directory") from None
        raise
    try:
        st_mode = _fs.os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):  # swapped in between the lstat and the open
            raise LockRefused(_kind(st_mode))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _fs.os.close(fd)
        return None
    except BaseException:
        _fs.os.close(fd)
        raise
    return Flock(path, fd)


def probe_lock(path: Path) -> str:
    """`"alive"`, `"dead"` or `"blocked"` for a token's lock, without creating or writing it.

    Read-only (a shared, non-blocking flock on an `O_RDONLY` descriptor): `queue status` works
    on a read-only volume and leaves the state directory as it found it. A missing lock file
    means a dead owner (an owner takes its lock before its first segment and keeps it).
    """
    try:
        fd = _fs.os.open(
            path, _fs.os.O_RDONLY | _fs.os.O_NOFOLLOW | _fs.os.O_NONBLOCK | _fs.os.O_CLOEXEC
        )
    except FileNotFoundError:
        return "dead"
    except OSError:
        return "blocked"  # a link (ELOOP), or unreadable: recovery could not take it either
    try:
        if not stat.S_ISREG(_fs.os.fstat(fd).st_mode):
            return "blocked"
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "alive"
    finally:
        _fs.os.close(fd)  # also drops the shared lock
    return "dead"


def _kind(mode: int) -> str:
    kind = file_kind(mode)
    return kind if stat.S_ISLNK(mode) else f"{kind}, not a regular file"
