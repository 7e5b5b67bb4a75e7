"""Creating files in the state directory: private modes, and never through a symbolic link.

The state directory is often a volume shared by replicas (and sometimes by other containers).
Every file the library creates there gets `Settings.file_mode` (0600 by default) at creation,
with `O_EXCL | O_NOFOLLOW` so an existing link is never written through; files opened by a
library that cannot take those flags (SQLite) are checked with `lstat` first. A link is refused
with `UnsafePath` naming it, not followed and not deleted: an operator decides what it was.

Folders get the same treatment, component by component: `open_state_dir` walks from the state
directory to a folder under it with `O_NOFOLLOW | O_DIRECTORY` at every step (so `sessions ->
/elsewhere`, or `feedback/quarantine -> /elsewhere`, is refused, not followed), and callers that
work on names (`os.replace`, SQLite) call `state_subdir` right before they create, rename or
delete. The state directory itself is the operator's choice and is trusted as given: it may be a
link to the volume. Errors name the folder relative to it, never an absolute path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from ._errors import UnsafePath

__all__ = [
    "DEFAULT_DIR_MODE",
    "DEFAULT_FILE_MODE",
    "create_private",
    "file_kind",
    "open_state_dir",
    "refuse_link",
    "state_subdir",
]

DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def file_kind(mode: int) -> str:
    """What an entry is, for an error or log line: "a symbolic link", "a FIFO", ...

    Every refusal of an entry under the state directory names its kind the same way.
    """
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a device"


def _open_component(parent: int, name: str, shown: str, mode: int | None) -> int:
    """Open folder `name` under the folder `parent`, creating it with `mode` when missing."""
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if mode is None:
                raise
            with contextlib.suppress(FileExistsError):  # a peer may create it at the same instant
                os.mkdir(name, mode, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                what = file_kind(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
            except OSError:
                what = "not a directory"
            raise UnsafePath(
                errno.ELOOP if what == "a symbolic link" else errno.ENOTDIR,
                f"{shown!r} in the state directory is {what}, not a folder; refusing to use it "
                "(the service never follows links under the state directory: replace it with "
                "a folder)",
            ) from None
    return os.open(name, _DIR_FLAGS, dir_fd=parent)  # created, then raced away: let it raise


def open_state_dir(state_dir: Path, rel: str, mode: int | None = DEFAULT_DIR_MODE) -> int:
    """A descriptor of the folder `<state_dir>/<rel>`, opened one component at a time.

    Operations made relative to it (`dir_fd=`) can never land outside the state directory, even
    if a folder is swapped for a link afterwards. Close it when done.

    Args:
        state_dir: Trusted as given (it may itself be a link an operator set up).
        rel: Folder under it, `/`-separated (`"feedback/quarantine"`).
        mode: Create missing folders with this mode; None: a missing folder raises.

    Raises:
        UnsafePath: a component of `rel` is a link, a file, a FIFO...; it names `rel`'s prefix.
    """
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [p for p in rel.split("/") if p]
        for i, part in enumerate(parts):
            child = _open_component(fd, part, "/".join(parts[: i + 1]), mode)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def state_subdir(state_dir: Path, rel: str, mode: int = DEFAULT_DIR_MODE) -> Path:
    """`<state_dir>/<rel>`, created with `mode` where missing, every component checked.

    Call it right before working on names in that folder (create, rename, delete): what it
    returns was a real folder at that moment. `UnsafePath` otherwise (see `open_state_dir`).
    """
    os.close(open_state_dir(state_dir, rel, mode))
    return state_dir / rel


def refuse_link(path: Path) -> None:
    """Raise `UnsafePath` when `path` exists and is not a regular file (a link above all)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(
            errno.ELOOP, f"{path} is a symbolic link; refusing to use it (remove or replace it)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(errno.EINVAL, f"{path} is not a regular file; refusing to use it")


def create_private(path: Path, mode: int = DEFAULT_FILE_MODE) -> None:
    """Create `path` empty with `mode` unless it exists; refuse it when it is a link."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
    except FileExistsError:
        refuse_link(path)
        return
    os.close(fd)
