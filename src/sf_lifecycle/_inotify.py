"""Linux inotify through ctypes: one descriptor, watches on folders, events parsed from `read`.

Used by `_sessionwatch.py` to learn at once that another process appended to a session file.
No dependency: `inotify_init1` and `inotify_add_watch` come from the C library already loaded
in the process (`ctypes.CDLL(None)`), and the events are read with `os.read` on the descriptor,
which the event loop watches with `add_reader`. `ctypes` is imported when a descriptor is first
opened, not with this module: a Python built without `_ctypes` still imports the library.

Deliberate choices:

* **Unavailable is an answer, not an error.** `Inotify.open()` raises `OSError` when the
  platform has no inotify (macOS, a C library without it, a Python without `ctypes`) or the
  kernel refuses one (the per-user limit `fs.inotify.max_user_instances`, 128 by default):
  the caller falls back to polling, and says so in a log line.
* **A descriptor is closed with its object.** `close()` is the way; an `Inotify` that is
  garbage-collected unclosed (a log never `aclose()`d, its event loop gone) closes its
  descriptor then (`weakref.finalize`), so forgotten logs cannot exhaust the 128 instances.
* **Non-blocking and close-on-exec.** The descriptor never blocks the event loop and never
  leaks into a child process (`sf-lifecycle serve` starts none, an application may).
* **Names, not paths.** A folder watch reports the name of the entry that changed; what it
  means (a session's `.log`) is for the caller to decide.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "IN_ATTRIB",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_DONT_FOLLOW",
    "IN_IGNORED",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "Inotify",
    "InotifyEvent",
]

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    """One event: the watch it came from, what happened, and the entry's name (may be empty)."""

    wd: int
    mask: int
    name: bytes


@functools.cache
def _libc_call(name: str) -> Callable[..., int]:
    try:
        import ctypes  # here, not at the top: a Python without `_ctypes` polls instead
    except ImportError as exc:
        raise OSError(errno.ENOSYS, f"inotify is not available here (no ctypes: {exc})") from None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, f"inotify is not available here ({name}: {exc})") from None
    fn.argtypes = {
        "inotify_init1": [ctypes.c_int],
        "inotify_add_watch": [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32],
    }[name]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _errno() -> int:
    import ctypes  # loaded already: `_libc_call` imported it to make the call

    return ctypes.get_errno()


class Inotify:
    """An inotify descriptor (`fd`), non-blocking, close-on-exec. Close it with `close()`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # Unclosed and collected (its event loop, which held it through `add_reader`, is gone):
        # the descriptor goes with it rather than staying open until the process exits.
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls) -> Inotify:
        """A new descriptor; `OSError` when the platform or the kernel's limits refuse one."""
        fd = _libc_call("inotify_init1")(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = _errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        return cls(fd)

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch `path` for `mask`; the watch descriptor. `OSError` when refused."""
        wd = _libc_call("inotify_add_watch")(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = _errno()
            raise OSError(err, f"inotify_add_watch {os.fspath(path)!r}: {os.strerror(err)}")
        return wd

    def read(self) -> list[InotifyEvent]:
        """Every event queued now (an empty list when none): never blocks."""
        out: list[InotifyEvent] = []
        while True:
            try:
                buf = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                return out
            if not buf:
                return out
            out.extend(parse(buf))

    def close(self) -> None:
        """Close the descriptor (its watches go with it); a second call does nothing."""
        self.fd = -1
        self._finalizer()  # closes the descriptor the first time only


def parse(buf: bytes) -> list[InotifyEvent]:
    """The events packed in one `read` of an inotify descriptor."""
    out = []
    pos, size = 0, _HEADER.size
    while pos + size <= len(buf):
        wd, mask, _cookie, length = _HEADER.unpack_from(buf, pos)
        name = buf[pos + size : pos + size + length].split(b"\0", 1)[0]
        out.append(InotifyEvent(wd, mask, name))
        pos += size + length
    return out
