"""One rollout per weights file, and `--abort` that always wins.

A rollout holds an exclusive `flock` on the weights file's directory for its whole run; `--abort`
does not wait for it: it writes stable 100 at once and keeps it there until the rollout holding
the lock has noticed (it checks the file every `--interval`) and exited.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from ._weights import WeightsFile

__all__ = ["ABORT_WAIT_S", "DirLock", "abort"]

#: How long `--abort` keeps the file at stable 100 while a running rollout notices and exits.
ABORT_WAIT_S = 10.0


class DirLock:
    """An exclusive `flock` on the weights file's directory: no extra file in the directory
    Traefik watches, and the kernel drops it when the process dies, even by SIGKILL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd = os.open(directory, os.O_RDONLY)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self._fd)


def abort(wf: WeightsFile, lock: DirLock, say: Callable[[str], None]) -> WeightsFile:
    """Write stable 100 now; keep it there until a rollout holding the lock has exited."""
    stable_100 = {wf.stable: 100, wf.candidate: 0}
    free = lock.try_acquire()
    after = wf.write(stable_100)
    if free:
        return after
    say(f"a rollout is running on {wf.path}: it stops at its next check (waiting for it)")
    deadline = time.monotonic() + ABORT_WAIT_S
    while True:
        gone = lock.try_acquire()
        # The rollout may have written a step between our read and our rename: write again.
        after = WeightsFile.load(
            wf.path, stable=wf.stable, candidate=wf.candidate, service=wf.service
        )
        if after.weights != stable_100:
            after = after.write(stable_100)
        if gone:
            return after
        if time.monotonic() >= deadline:
            say(
                f"the rollout still holds the lock after {ABORT_WAIT_S:g}s; "
                f"weights are {after.weights}"
            )
            return after
        time.sleep(0.1)
