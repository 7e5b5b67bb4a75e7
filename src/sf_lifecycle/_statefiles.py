"""Creating files in the state directory: private modes, and never through a symbolic link.

The state directory is often a volume shared by replicas (and sometimes by other containers).
Every file the library creates there gets `Settings.file_mode` (0600 by default) at creation,
with `O_EXCL | O_NOFOLLOW` so an existing link is never written through; files opened by a
library that cannot take those flags (SQLite) are checked with `lstat` first. A link is refused
with `UnsafePath` naming it, not followed and not deleted: an operator decides what it was.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ._errors import UnsafePath

__all__ = ["DEFAULT_DIR_MODE", "DEFAULT_FILE_MODE", "create_private", "refuse_link"]

DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700


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
